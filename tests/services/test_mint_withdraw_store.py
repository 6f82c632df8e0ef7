"""Withdrawals' reserved outputs in the mint's store (``services.ecash.store``), against a
real PostgreSQL: a retry is one only where it names its outputs as they were reserved."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import msgspec
import pytest

from constellation.ecash import mint as m
from constellation.protocol import cashu as nut
from services.ecash.store import MintStore
from tests.services.postgres import throwaway_postgres

KEYSET, RETIRED = "00aa", "00bb"
TXID = b"t" * 32


@pytest.fixture
async def store() -> AsyncIterator[MintStore]:
    async with throwaway_postgres("mint-withdraw") as url:
        s = await MintStore.open(url)
        yield s
        await s.close()


def outputs(*amounts: int) -> list[nut.BlindedMessage]:
    return [nut.BlindedMessage(a, KEYSET, (b"\x02" + os.urandom(32)).hex()) for a in amounts]


async def test_a_retry_names_its_outputs_as_they_were_reserved(store: MintStore) -> None:
    reserved = outputs(1, 4)
    assert not await store.withdraw_reserved(TXID, reserved)
    await store.reserve_withdraw(TXID, reserved)
    assert await store.withdraw_reserved(TXID, reserved)
    await store.reserve_withdraw(TXID, reserved)  # the same again: taken
    other_keyset = [msgspec.structs.replace(o, id=RETIRED) for o in reserved]
    swapped = [msgspec.structs.replace(o, amount=a) for o, a in zip(reserved, (4, 1), strict=True)]
    for changed in (other_keyset, swapped):
        assert not await store.withdraw_reserved(TXID, changed)
        with pytest.raises(m.CashuError, match="as other keysets or amounts"):
            await store.reserve_withdraw(TXID, changed)
    with pytest.raises(m.CashuError, match="another withdrawal"):
        await store.reserve_withdraw(b"u" * 32, reserved)
    await store.release_withdraw(TXID)
    assert not await store.withdraw_reserved(TXID, reserved)


async def test_a_reservation_from_before_keysets_were_kept_matches_by_its_outputs(
    store: MintStore,
) -> None:
    reserved = outputs(2, 8)
    async with store.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO mint_withdraw_outputs (b_, txid) SELECT b, $2 FROM unnest($1::bytea[]) b",
            [bytes.fromhex(o.B_) for o in reserved],
            TXID,
        )
    assert await store.withdraw_reserved(TXID, reserved)
    assert await store.withdraw_reserved(
        TXID, [msgspec.structs.replace(o, id=RETIRED) for o in reserved]
    )
