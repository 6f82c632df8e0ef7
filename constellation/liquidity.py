"""Keeping channels able to carry the settlements: when to splice, and how much.

An operator pays its peers over direct channels; what it can send a peer is that
channel's ``spendable``. Before the expected payments outgrow it, the channel is
spliced in from the on-chain wallet; a channel with far more than it needs may be
spliced out to the wallet, to fund the channels that are short. Channels are never
closed to rebalance, and a channel with a splice in flight is left alone until it
confirms (Core Lightning allows one at a time).

``plan`` is pure: the node's channels, the expected outgoing amount per peer (what the
next batches are expected to send), the wallet and the limits in; the splices out.

- A usable channel is short where ``spendable < headroom * expected``: it gets a
  splice in of the difference, at least ``min_splice_sat`` and at most
  ``max_splice_sat``, while the wallet keeps ``keep_onchain_sat`` and pays each
  splice's fee. Channels are served most short first.
- Where the wallet cannot cover every short channel, a channel with more than
  ``excess * expected`` spendable (and more than ``min_splice_sat`` over it) gives the
  surplus back to the wallet: never below its own target, never more than
  ``max_splice_sat``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ChannelView:
    channel_id: str
    peer: str
    spendable_msat: int
    usable: bool  # open and connected
    splicing: bool  # a splice in flight


@dataclass(frozen=True)
class Limits:
    headroom: float = 2.0
    excess: float = 6.0
    min_splice_sat: int = 100_000
    max_splice_sat: int = 10_000_000
    keep_onchain_sat: int = 100_000
    fee_sat: int = 1_000  # what the wallet sets aside for each splice's fee


@dataclass(frozen=True)
class Splice:
    channel_id: str
    peer: str
    relative_sat: int  # > 0: in, from the wallet; < 0: out, to the wallet
    reason: str


DEFAULT = Limits()


def _sat(msat: int) -> int:
    return -(-msat // 1000)  # rounded up


def plan(
    channels: Sequence[ChannelView],
    expected_msat: Mapping[str, int],
    onchain_sat: int,
    limits: Limits = DEFAULT,
    coming_sat: int = 0,
) -> list[Splice]:
    free = [c for c in channels if c.usable and not c.splicing]
    want = {c.channel_id: int(limits.headroom * expected_msat.get(c.peer, 0)) for c in free}
    short = sorted(
        (c for c in free if c.spendable_msat < want[c.channel_id]),
        key=lambda c: (c.spendable_msat - want[c.channel_id], c.channel_id),
    )
    budget = onchain_sat - limits.keep_onchain_sat
    splices: list[Splice] = []
    unmet = 0
    for c in short:
        need = max(limits.min_splice_sat, _sat(want[c.channel_id] - c.spendable_msat))
        amount = min(need, limits.max_splice_sat, budget - limits.fee_sat)
        if amount < limits.min_splice_sat:
            unmet += need
            continue
        budget -= amount + limits.fee_sat
        splices.append(
            Splice(
                c.channel_id,
                c.peer,
                amount,
                f"can send {c.spendable_msat} msat; the next batches want {want[c.channel_id]}",
            )
        )
    unmet -= coming_sat  # splices out in flight refill the wallet once they confirm
    if unmet <= 0:
        return splices
    for c in sorted(free, key=lambda c: (-c.spendable_msat, c.channel_id)):
        if unmet <= 0:
            break
        target = want[c.channel_id]
        if target <= 0 or c.spendable_msat <= limits.excess * expected_msat.get(c.peer, 0):
            continue
        surplus = (c.spendable_msat - target) // 1000
        amount = min(surplus, limits.max_splice_sat, unmet + limits.min_splice_sat)
        if amount < limits.min_splice_sat:
            continue
        unmet -= amount
        splices.append(
            Splice(
                c.channel_id,
                c.peer,
                -amount,
                f"can send {c.spendable_msat} msat, over {limits.excess:g}x what it needs; "
                "the wallet is short for other channels",
            )
        )
    return splices
