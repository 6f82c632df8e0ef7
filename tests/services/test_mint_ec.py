"""The mint's EC process (``services.ecash.ec``): the real child, its answers against the
rules run in this process, refusals with their NUT codes, keyset rotations, and a child
that dies."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import msgspec
import pytest

from constellation.ecash import client
from constellation.ecash import mint as m
from constellation.ecash.keyset import Keyset
from constellation.protocol import cashu as nut
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
    await asyncio.sleep(0)  # the calls are on their way
    os.kill(first, signal.SIGKILL)
    done = await asyncio.gather(*held, return_exceptions=True)
    failed = [d for d in done if isinstance(d, Stopped)]
    assert failed, "the kill came after every answer: no call was held"
    assert all(isinstance(d, (Stopped, list)) for d in done)
    assert await ec.call(BEFORE, "sign", outputs[0]) == BEFORE.sign(outputs[0])
    assert ec.proc is not None and ec.proc.pid != first


async def test_closing_stops_the_child() -> None:
    ec = EC()
    await ec.start()
    assert ec.proc is not None
    proc = ec.proc
    await ec.close()
    assert proc.returncode == 0
