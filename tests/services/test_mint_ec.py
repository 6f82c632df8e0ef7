"""The mint's EC process (``services.ecash.ec``): the real child, its answers against the
rules run in this process, refusals with their NUT codes, keyset rotations, and a child
that dies."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import uvloop

from constellation.ecash import client
from constellation.ecash import mint as m
from constellation.ecash.keyset import Keyset
from constellation.protocol import cashu as nut
from services.ecash import ec as ec_module
from services.ecash.ec import EC, Stopped

MASTER = bytes(range(32))
OLD = Keyset.derive(MASTER, "sat", 0, 0)
NEW = Keyset.derive(MASTER, "sat", 1, 100)  # 100 ppk: 10 inputs cost 1 sat
BEFORE = m.Mint([OLD])
AFTER = m.Mint([Keyset(OLD.unit, OLD.index, 0, OLD.secrets, active=False), NEW])
KEYS = {k.id: k.keys for k in AFTER.keysets.values()}
T = 1_800_000_000


def issue(amount: int) -> list[nut.Proof]:
    outputs, secrets = client.outputs_for(amount, OLD.id)
    return client.unblind(BEFORE.sign(outputs), outputs, secrets, KEYS)


@pytest.fixture
async def ec() -> AsyncIterator[EC]:
    made = EC()
    await made.start()
    yield made
    await made.close()


async def test_a_swap_is_checked_and_signed_as_the_rules_here_do_it(ec: EC) -> None:
    outputs, _ = client.outputs_for(1000, OLD.id)
    request = nut.SwapRequest(issue(1000), outputs)
    spend, out, signatures = await ec.call(BEFORE, "swap", request, T)
    here_spend, here_out = BEFORE.swap(request, T)
    assert (spend, out) == (here_spend, here_out)
    assert signatures == BEFORE.sign(outputs)  # NUT-12 nonces: the same DLEQ proofs
    assert await ec.call(BEFORE, "spend", request.inputs, T) == here_spend


async def test_a_refusal_comes_back_with_its_nut_code(ec: EC) -> None:
    outputs, _ = client.outputs_for(1000, OLD.id)
    forged = [msgspec.structs.replace(p, C=issue(p.amount)[0].C) for p in issue(1000)]
    with pytest.raises(m.CashuError) as e:
        await ec.call(BEFORE, "swap", nut.SwapRequest(forged, outputs), T)
    assert e.value.code == m.PROOF_INVALID
    with pytest.raises(m.CashuError) as e:
        await ec.call(BEFORE, "swap", nut.SwapRequest(issue(1000), outputs[:-1]), T)
    assert e.value.code == m.UNBALANCED
    with pytest.raises(RuntimeError, match="the EC process failed"):
        await ec.call(BEFORE, "sign", [outputs[0], "not an output"])
    assert await ec.call(BEFORE, "sign", outputs) == BEFORE.sign(outputs)  # it goes on


async def test_after_a_rotation_the_child_signs_with_the_new_keyset(ec: EC) -> None:
    outputs, _ = client.outputs_for(1000, NEW.id)
    inputs = issue(1000)
    with pytest.raises(m.CashuError) as e:  # a keyset the child has not heard of
        await ec.call(BEFORE, "swap", nut.SwapRequest(inputs, outputs), T)
    assert e.value.code == m.KEYSET_UNKNOWN
    _, _, signatures = await ec.call(AFTER, "swap", nut.SwapRequest(inputs, outputs), T)
    assert signatures == AFTER.sign(outputs)
    old, _ = client.outputs_for(1000, OLD.id)
    with pytest.raises(m.CashuError) as e:  # the old keyset signs no more
        await ec.call(AFTER, "swap", nut.SwapRequest(inputs, old), T)
    assert e.value.code == m.KEYSET_INACTIVE
    spend = await ec.call(AFTER, "spend", inputs, T)  # and is still spent from
    assert spend.amount == 1000


async def test_many_calls_at_once_each_get_their_own_answer(ec: EC) -> None:
    requests = [client.outputs_for(amount, OLD.id)[0] for amount in range(1, 201)]
    answers = await asyncio.gather(*(ec.call(BEFORE, "sign", r) for r in requests))
    assert answers == [BEFORE.sign(r) for r in requests]


async def test_a_child_that_dies_fails_what_it_held_and_another_takes_over(ec: EC) -> None:
    outputs = [client.outputs_for(1000, OLD.id)[0] for _ in range(50)]
    assert ec.proc is not None
    first = ec.proc.pid
    held = [asyncio.create_task(ec.call(BEFORE, "sign", o)) for o in outputs]
    await asyncio.wait(held, return_when=asyncio.FIRST_COMPLETED)  # it is answering
    os.kill(first, signal.SIGKILL)
    done = await asyncio.gather(*held, return_exceptions=True)
    answered = [d for d in done if isinstance(d, list)]
    assert answered and len(answered) < len(done), "the kill came after every answer"
    assert all(isinstance(d, Stopped) for d in done if not isinstance(d, list))
    signed = [BEFORE.sign(o) for o, d in zip(outputs, done, strict=True) if isinstance(d, list)]
    assert answered == signed
    assert await ec.call(BEFORE, "sign", outputs[0]) == BEFORE.sign(outputs[0])
    assert ec.proc is not None and ec.proc.pid != first


def test_under_uvloop_a_call_just_after_the_child_died_fails_and_nothing_else() -> None:
    """uvloop closes the pipe to a dead child before the reader hears of it: a call in
    between is failed as the others, with no error elsewhere (the mint runs on uvloop)."""

    async def scenario() -> list[dict[str, Any]]:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
        ec = EC()
        await ec.start()
        assert ec.proc is not None
        outputs = client.outputs_for(1000, OLD.id)[0]
        await ec.call(BEFORE, "sign", outputs)
        os.kill(ec.proc.pid, signal.SIGKILL)
        results: list[asyncio.Task[Any]] = []
        while ec.proc is not None and len(results) < 10_000:  # until the reader hears
            call = asyncio.create_task(ec.call(BEFORE, "sign", outputs))
            results.append(call)
            await asyncio.sleep(0.0005)
        outcomes = await asyncio.gather(*results, return_exceptions=True)
        # a call that ran after the reader heard started the next child
        signed = BEFORE.sign(outputs)
        assert all(isinstance(o, Stopped) or o == signed for o in outcomes), outcomes
        assert any(isinstance(o, Stopped) for o in outcomes)
        assert await ec.call(BEFORE, "sign", outputs) == BEFORE.sign(outputs)  # a new one
        await ec.close()
        return errors

    assert uvloop.run(scenario()) == []


async def test_a_child_that_answers_nothing_is_killed_and_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ec_module, "STUCK_S", 0.4)
    ec = EC()  # its watchdog with the short wait
    await ec.start()
    assert ec.proc is not None
    stuck = ec.proc.pid
    os.kill(stuck, signal.SIGSTOP)
    outputs = client.outputs_for(8, OLD.id)[0]
    with pytest.raises(Stopped, match="no answer in 0 s"):
        await asyncio.wait_for(ec.call(BEFORE, "sign", outputs), 5)
    assert await ec.call(BEFORE, "sign", outputs) == BEFORE.sign(outputs)
    assert ec.proc is not None and ec.proc.pid != stuck
    await ec.close()


async def test_closing_stops_the_child_and_fails_what_it_did_not_answer() -> None:
    ec = EC()
    await ec.start()
    assert ec.proc is not None
    proc = ec.proc
    outputs = [client.outputs_for(1000, OLD.id)[0] for _ in range(50)]
    held = [asyncio.create_task(ec.call(BEFORE, "sign", o)) for o in outputs]
    await asyncio.wait(held, return_when=asyncio.FIRST_COMPLETED)
    await ec.close()
    assert proc.returncode == 0
    done = await asyncio.gather(*held, return_exceptions=True)
    assert all(isinstance(d, (list, Stopped)) for d in done)
    with pytest.raises(Stopped, match="stopping"):
        await ec.call(BEFORE, "sign", outputs[0])


async def test_children_that_keep_stopping_make_it_unsteady() -> None:
    stops: list[None] = []
    ec = EC(lambda: stops.append(None))
    outputs = client.outputs_for(8, OLD.id)[0]
    for n in range(ec_module.UNSTEADY[0]):
        assert not ec.unsteady(), n
        await ec.start()
        assert ec.proc is not None
        await ec.call(BEFORE, "sign", outputs)  # it served: killed, say, for memory
        os.kill(ec.proc.pid, signal.SIGKILL)
        with pytest.raises(Stopped):
            await ec.call(BEFORE, "sign", outputs)
    assert ec.unsteady() and len(stops) == ec_module.UNSTEADY[0]
    await ec.close()
    assert len(stops) == ec_module.UNSTEADY[0]  # a close is no stop


async def test_children_that_crash_as_they_start_are_started_again_ever_more_slowly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ec_module, "BACKOFF_S", (0.4, 0.8))
    monkeypatch.setattr(ec_module, "UNSTEADY", (3, 0.3))  # paused, they stop less often
    started: list[int] = []
    spawn = asyncio.create_subprocess_exec

    async def counted(*argv: Any, **kw: Any) -> asyncio.subprocess.Process:
        proc = await spawn(*argv, **kw)
        started.append(proc.pid)
        return proc

    monkeypatch.setattr(asyncio, "create_subprocess_exec", counted)
    crashing = [sys.executable, "-c", "raise SystemExit(3)"]
    ec = EC(argv=crashing)
    outputs = client.outputs_for(8, OLD.id)[0]

    async def fails(why: str) -> None:
        with pytest.raises(Stopped, match=why):
            await ec.call(BEFORE, "sign", outputs)

    await fails("stopped")  # the first crash: the next starts at once
    await fails("stopped")
    assert len(started) == 2 and ec.fruitless == 2
    await fails(r"keeps stopping as it starts; next try in 0\.[0-4] s")  # no third child yet
    assert len(started) == 2
    await asyncio.sleep(0.45)
    await fails("stopped")  # the pause is over: a third, which crashes too
    assert len(started) == 3
    await asyncio.sleep(0.45)
    await fails("keeps stopping")  # the pause doubled: 0.8 s
    assert len(started) == 3
    ec.argv = ec_module.CHILD  # fixed: the next, once the pause is over, answers
    await asyncio.sleep(0.4)
    assert ec.unsteady()  # crashing as they start: not ready, however slowly
    assert await ec.call(BEFORE, "sign", outputs) == BEFORE.sign(outputs)
    assert len(started) == 4 and ec.fruitless == 0 and not ec.unsteady()
    assert ec.proc is not None
    os.kill(ec.proc.pid, signal.SIGKILL)  # a child that had answered: the next at once
    await fails("stopped")
    assert ec.fruitless == 0
    assert await ec.call(BEFORE, "sign", outputs) == BEFORE.sign(outputs)
    assert len(started) == 5
    ec.fruitless = 5_000  # a crash loop of days: the pause stays at its most
    ec.stops.append(time.monotonic())
    assert ec_module.BACKOFF_S[1] - 0.1 < ec.backoff() <= ec_module.BACKOFF_S[1]
    await ec.close()


async def test_a_task_of_the_child_that_fails_takes_the_child_and_is_said(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stops: list[None] = []
    ec = EC(lambda: stops.append(None))
    monkeypatch.setattr(ec_module, "STUCK_S", None)  # its watchdog fails at once
    await ec.start()
    assert ec.proc is not None
    first = ec.proc
    for _ in range(100):
        if ec.proc is None:
            break
        await asyncio.sleep(0.01)
    assert ec.proc is None and len(stops) == 1
    assert "EC process task failed" in caplog.text
    monkeypatch.undo()
    outputs = client.outputs_for(8, OLD.id)[0]
    assert await ec.call(BEFORE, "sign", outputs) == BEFORE.sign(outputs)
    assert ec.proc is not None and ec.proc is not first
    await ec.close()
    assert first.returncode is not None  # the first child was killed and reaped
