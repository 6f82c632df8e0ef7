"""What an indexer took while its database was down, kept to be stored once it is back:
past ``MAX_RANGE`` checkpoints the oldest are let go with their records' keys (gaps that
the backfill asks another member for), and the rest are kept whole."""

from __future__ import annotations

from constellation.guild import Checkpoint
from constellation.lightclient import index as lc
from constellation.lightclient import proof as pf
from services.indexer.checkpoints import MAX_RANGE, _Unstored


def _held(height: int) -> lc.Held:
    checkpoint = Checkpoint("g", height, bytes(32), 1000 * height, bytes(32), bytes(32))
    return lc.Held(pf.SignedCheckpoint(checkpoint, bytes(64)), [], {})


def _taken(
    height: int,
) -> tuple[list[lc.Held], list[tuple[bytes, int, bytes]], dict[int, lc.Coins]]:
    touch = (height.to_bytes(32, "big"), height, bytes(32))
    return [_held(height)], [touch], {height: lc.Coins([], [height.to_bytes(32, "big")])}


def test_what_was_taken_is_kept_in_order_until_stored() -> None:
    unstored = _Unstored()
    for height in (5, 6, 7):
        unstored.add(*_taken(height))
    assert [h.checkpoint.checkpoint.height for h in unstored.held] == [5, 6, 7]
    assert [t[1] for t in unstored.touches] == [5, 6, 7]
    assert sorted(unstored.coins) == [5, 6, 7]


def test_past_max_range_the_oldest_are_let_go_with_their_keys() -> None:
    unstored = _Unstored()
    for height in range(MAX_RANGE + 25):
        unstored.add(*_taken(height))
    kept = [h.checkpoint.checkpoint.height for h in unstored.held]
    assert kept == list(range(25, MAX_RANGE + 25))
    assert {t[1] for t in unstored.touches} == set(kept)
    assert sorted(unstored.coins) == kept
