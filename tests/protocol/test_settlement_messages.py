"""Settlement messages between operators: what decodes, and what is refused."""

from __future__ import annotations

import msgspec
import pytest

from constellation.errors import MessageError
from constellation.keys import SigningKey
from constellation.protocol import settlement as sp

ID = b"\x01" * 32
OWNER = SigningKey(b"\x02" * 32).pubkey


def entry(seq: int, value: int = 5) -> sp.Entry:
    return sp.Entry(seq, ID, ID, OWNER, value)


@pytest.mark.parametrize(
    "msg",
    [
        sp.Announce([entry(3), entry(4)]),
        sp.Announced(7),
        sp.AskInvoice(1, 1, 9, 45),
        sp.Offer(1, "lnbcrt1..."),
        sp.Refuse(2, "batch 1 is open"),
        sp.AskCancel(3),
        sp.Cancelled(3, True),
    ],
)
def test_every_message_round_trips(msg: sp.Message) -> None:
    assert sp.decode(sp.encode(msg)) == msg


def raw(*fields: object) -> bytes:
    return msgspec.msgpack.encode(list(fields))


E = [1, ID, ID, OWNER, 5]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\xc1", "not msgpack"),
        (raw("z", 1), "an unknown kind"),
        (raw("N", 1, 2), "a field too many"),
        (raw("N", -1), "a negative number"),
        (raw("n", []), "an empty announcement"),
        (raw("n", [E] * (sp.MAX_ENTRIES + 1)), "too many entries"),
        (raw("n", [[1, ID[:31], ID, ID, 5]]), "a short coin id"),
        (raw("n", [[1, ID, ID, OWNER, 0]]), "a zero value"),
        (raw("n", [[1, ID, ID, b"\xff" * 32, 5]]), "an owner that is no key"),
        (raw("n", [E, [3, ID, ID, OWNER, 5]]), "a gap between entries"),
        (raw("n", [[0, ID, ID, OWNER, 5]]), "obligation 0"),
        (raw("i", 1, 5, 4, 10), "last before first"),
        (raw("i", 1, 1, 1, 0), "a batch of nothing"),
        (raw("I", 1, "x" * (sp.MAX_BOLT11 + 1)), "an oversized invoice"),
        (raw("R", 1, "x" * (sp.MAX_REASON + 1)), "an oversized reason"),
        (raw("C", 1, 1), "paid is not a bool"),
    ],
)
def test_malformed_messages_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(MessageError):
        sp.decode(data)
