"""The splice policy: within its limits, never touching a channel that cannot take a
splice, never spending the wallet's floor, and topping up every short channel it can."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from constellation.liquidity import ChannelView, Limits, Splice, plan

LIMITS = Limits()
PEERS = ["p0", "p1", "p2", "p3", "p4"]

channels = st.lists(
    st.builds(
        ChannelView,
        channel_id=st.sampled_from([f"c{i}" for i in range(8)]),
        peer=st.sampled_from(PEERS),
        spendable_msat=st.integers(0, 50_000_000_000),
        usable=st.booleans(),
        splicing=st.booleans(),
    ),
    max_size=8,
    unique_by=lambda c: c.channel_id,
)
expected = st.dictionaries(st.sampled_from(PEERS), st.integers(0, 10_000_000_000))


@given(channels, expected, st.integers(0, 100_000_000))
def test_splices_keep_to_their_limits_and_the_wallet_s_floor(
    chans: list[ChannelView], want: dict[str, int], onchain: int
) -> None:
    splices = plan(chans, want, onchain, LIMITS)
    by_id = {c.channel_id: c for c in chans}
    assert len({s.channel_id for s in splices}) == len(splices)  # one per channel
    spent = 0
    for s in splices:
        c = by_id[s.channel_id]
        assert c.usable and not c.splicing and s.peer == c.peer
        assert LIMITS.min_splice_sat <= abs(s.relative_sat) <= LIMITS.max_splice_sat
        target = LIMITS.headroom * want.get(c.peer, 0)
        if s.relative_sat > 0:
            assert c.spendable_msat < target  # only a short channel is topped up
            spent += s.relative_sat + LIMITS.fee_sat
        else:  # a splice out never takes a channel below what it needs
            assert c.spendable_msat + s.relative_sat * 1000 >= target > 0
    assert spent <= max(0, onchain - LIMITS.keep_onchain_sat)


@given(channels, expected)
def test_with_a_wallet_to_spare_every_short_channel_is_topped_up(
    chans: list[ChannelView], want: dict[str, int]
) -> None:
    splices = {s.channel_id: s for s in plan(chans, want, 10**12, LIMITS)}
    assert all(s.relative_sat > 0 for s in splices.values())  # nothing spliced out
    for c in chans:
        target = int(LIMITS.headroom * want.get(c.peer, 0))
        if c.usable and not c.splicing and c.spendable_msat < target:
            s = splices[c.channel_id]
            gap = target - c.spendable_msat
            assert s.relative_sat * 1000 >= gap or s.relative_sat == LIMITS.max_splice_sat


def test_a_short_wallet_is_refilled_from_a_channel_with_far_more_than_it_needs() -> None:
    chans = [
        ChannelView("rich", "p0", 40_000_000_000, True, False),
        ChannelView("poor", "p1", 0, True, False),
    ]
    want = {"p0": 1_000_000_000, "p1": 2_000_000_000}
    splices = plan(chans, want, 50_000, LIMITS)
    assert [(s.channel_id, s.relative_sat > 0) for s in splices] == [("rich", False)]
    out = splices[0].relative_sat
    assert 40_000_000_000 + out * 1000 >= 2 * 1_000_000_000  # rich keeps its own target
    # once the splice out confirmed, the wallet tops the poor channel up
    after = plan(
        [ChannelView("rich", "p0", 40_000_000_000 + out * 1000, True, False), chans[1]],
        want,
        50_000 - out,
        LIMITS,
    )
    assert after == [Splice("poor", "p1", 4_000_000, after[0].reason)]
    # while the splice out is in flight (the wallet is refilled once it confirms), no
    # other channel is spliced out for the same shortfall (one was, every poll)
    rich2 = ChannelView("rich2", "p2", 40_000_000_000, True, False)
    want2 = {**want, "p2": 1_000_000_000}
    assert plan([*chans, rich2], want2, 50_000, LIMITS, coming_sat=-out) == []


def test_nothing_to_do_where_every_channel_can_carry_what_is_expected() -> None:
    chans = [ChannelView("a", "p0", 5_000_000_000, True, False)]
    assert plan(chans, {"p0": 1_000_000_000}, 10**9, LIMITS) == []
    assert plan(chans, {}, 10**9, LIMITS) == []
