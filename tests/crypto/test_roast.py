"""ROAST under attack: up to n-t signers silent, slow, stalling or sending garbage.

An event-driven simulation delivers messages in a random order with random delays; the
coordinator must always finish with a signature that coincurve verifies, within n-t+1
sessions, and must never blame an honest signer.
"""

from __future__ import annotations

import heapq
import random

import pytest
from coincurve import PublicKeyXOnly
from hypothesis import given, settings
from hypothesis import strategies as st

from constellation.crypto import frost
from constellation.crypto.roast import Coordinator, Signer, SignRequest
from constellation.errors import SigningError, UnknownNonce
from tests.crypto.dealer import deal

BEHAVIOURS = ("silent", "stall", "bad_psig", "bad_nonce", "slow", "out_of_turn")


def simulate(n: int, t: int, faulty: dict[int, str], seed: int) -> Coordinator:
    rng = random.Random(seed)
    group, shares = deal(n, t, rng)
    signers = [Signer(group, i, shares[i]) for i in range(n)]
    coordinator = Coordinator(group, b"guild checkpoint 42")
    queue: list[tuple[float, int, int, bytes | None, bytes]] = []
    seq = 0

    def send(at: float, who: int, psig: bytes | None, pubnonce: bytes) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(queue, (at, seq, who, psig, pubnonce))

    def delay(who: int) -> float:
        return rng.uniform(50, 100) if faulty.get(who) == "slow" else rng.uniform(0, 10)

    for i in range(n):
        kind = faulty.get(i)
        if kind == "silent":
            continue
        nonce = b"\x05" * 66 if kind == "bad_nonce" else signers[i].presign()
        send(delay(i), i, None, nonce)
        if kind == "out_of_turn":
            send(delay(i), i, b"\x01" * 32, signers[i].presign())

    def deliver(now: float, request: SignRequest) -> None:
        for i in request.ids:
            kind = faulty.get(i)
            if kind == "stall":
                continue
            try:
                psig, nonce = signers[i].sign(request)
            except SigningError:
                assert kind == "out_of_turn", "an honest signer refused a valid request"
                continue  # it replaced the nonce the coordinator holds
            if kind == "bad_psig":
                psig = (int.from_bytes(psig, "big") ^ 1).to_bytes(32, "big")
            send(now + delay(i), i, psig, nonce)

    while queue and coordinator.signature is None:
        now, _, who, psig, nonce = heapq.heappop(queue)
        for request in coordinator.receive(who, psig, nonce):
            assert len(request.ids) == t
            deliver(now, request)
    return coordinator


CONFIGS = [(3, 2), (5, 3), (7, 5)]


@given(st.sampled_from(CONFIGS), st.data())
@settings(max_examples=60, deadline=None)
def test_roast_always_finishes(config: tuple[int, int], data: st.DataObject) -> None:
    n, t = config
    bad = data.draw(st.lists(st.integers(0, n - 1), max_size=n - t, unique=True))
    faulty = {i: data.draw(st.sampled_from(BEHAVIOURS)) for i in bad}
    coordinator = simulate(n, t, faulty, data.draw(st.integers(0, 2**32)))
    sig = coordinator.signature
    assert sig is not None, f"no signature with faulty={faulty}"
    key = PublicKeyXOnly(coordinator.group.thresh_pk[1:])
    assert key.verify(sig, coordinator.msg)
    assert len(coordinator.sessions) <= n - t + 1
    honest_blamed = {i for i in coordinator.malicious if faulty.get(i) in (None, "slow")}
    assert not honest_blamed


@pytest.mark.parametrize(("n", "t"), CONFIGS)
def test_worst_case_uses_every_session(n: int, t: int) -> None:
    # every faulty signer stalls in a different session before the honest set forms
    faulty = dict.fromkeys(range(n - t), "stall")
    coordinator = simulate(n, t, faulty, seed=1)
    assert coordinator.signature is not None
    assert len(coordinator.sessions) <= n - t + 1


def test_signer_refuses_a_stale_or_foreign_nonce() -> None:
    group, shares = deal(3, 2, random.Random(9))
    a, b = Signer(group, 0, shares[0]), Signer(group, 1, shares[1])
    na, nb = a.presign(), b.presign()
    request = SignRequest(0, (0, 1), (na, nb), b"m")
    a.sign(request)
    with pytest.raises(UnknownNonce):
        a.sign(request)  # the same nonce again: refused, never a second signature
    with pytest.raises(SigningError, match="not part"):
        Signer(group, 2, shares[2]).sign(request)
    with pytest.raises(UnknownNonce):
        Signer(group, 0, shares[0]).sign(request)  # a restarted signer: nonce forgotten


def test_signer_pool_is_bounded_and_any_pooled_nonce_signs_once() -> None:
    group, shares = deal(3, 2, random.Random(11))
    a, b = Signer(group, 0, shares[0], pool_size=3), Signer(group, 1, shares[1])
    issued = [a.presign() for _ in range(5)]  # the first two are evicted and erased
    for k, nonce in enumerate(issued):
        request = SignRequest(k, (0, 1), (nonce, b.presign()), b"m")
        if k < 2:
            with pytest.raises(UnknownNonce):
                a.sign(request)
            continue
        psig, _ = a.sign(request)
        assert frost.partial_sig_verify(
            psig, request.pubnonces, group.signers((0, 1)), (), (), b"m", 0
        )
        with pytest.raises(UnknownNonce):
            a.sign(request)


def test_coordinator_rejects_strangers_and_ignores_blamed() -> None:
    group, shares = deal(3, 2, random.Random(10))
    coordinator = Coordinator(group, b"m")
    with pytest.raises(SigningError):
        coordinator.receive(7, None, Signer(group, 0, shares[0]).presign())
    assert coordinator.receive(0, None, b"\x00" * 66) == []
    assert 0 in coordinator.malicious
    assert coordinator.receive(0, None, Signer(group, 0, shares[0]).presign()) == []
