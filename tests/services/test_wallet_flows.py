"""The wallet's payments through a mint that is not to be believed blindly
(``services.wallet_money.Flows``): a quote for another amount or invoice is not paid; a
payment the mint says is paid is shown with its proof, or said to have none; and one
whose state the mint cannot tell now (an outage, a rate limit) is pending, not failed.
The mint here is a stand-in that answers as a faulty or hostile one would."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from constellation.address import Network
from constellation.ecash.keyset import Keyset
from constellation.payto import parse
from services.ecash.client import MintClient, MintError
from services.lnsim.network import Network as Lightning
from services.wallet import WalletFile
from services.wallet_money import Flows, MoneyError

WORDS = " ".join(["abandon"] * 11 + ["about"])


class Mint(MintClient):
    """Answers each path with the first of ``answers`` whose prefix it starts with."""

    def __init__(self, answers: dict[str, Callable[[Any], Any]]) -> None:
        super().__init__("http://mint.test", None)  # type: ignore[arg-type]
        keyset = Keyset.derive(b"m" * 32, "sat", 0, 0)
        self.keys, self.fees, self.active = {keyset.id: keyset.keys}, {keyset.id: 0}, keyset.id
        self.answers = answers

    async def ok(self, path: str, body: Any = None, timeout_s: float | None = None) -> Any:
        answer = next(a for prefix, a in self.answers.items() if path.startswith(prefix))
        return answer(body)


def invoice(sat: int) -> tuple[str, str]:
    """A payee's BOLT11 invoice for ``sat`` and its preimage (hex)."""
    lightning = Lightning(time.time, chain="regtest")
    lightning.add_node("payee")
    made = lightning.invoice("payee", sat * 1000, f"l{time.time_ns()}", "coffee", 3600)
    return made.bolt11, made.preimage.hex()


def flows(where: Path, mint: Mint) -> Flows:
    where.mkdir()
    path = where / "wallet.json"
    doc = WalletFile.create(path, "http://gw.test", "regtest", WORDS, mint.url)
    gateway: Any = None  # asked nothing here
    return Flows(doc, path, gateway, mint, io.StringIO())


async def test_a_quote_for_another_amount_or_invoice_is_not_paid(tmp_path: Path) -> None:
    """The wallet pays the mint the quote's amount (the fee reserve is shown apart and
    bounded by --max-fee-msat): a mint quoting 5000 sat for a 1000 sat invoice, or
    another invoice, would have been paid that."""
    bolt11, _ = invoice(1000)
    payto = parse(bolt11, Network.REGTEST)
    other, _ = invoice(1000)
    for i, (amount, request) in enumerate(((1000, bolt11), (5000, bolt11), (1000, other))):
        quote = {"quote": "q", "request": request, "amount": amount, "fee_reserve": 2}
        answer = Mint({"/v1/melt": lambda _, quote=quote: quote})  # type: ignore[misc]
        wallet = flows(tmp_path / str(i), answer)
        if (amount, request) == (1000, bolt11):
            assert (await wallet.quote(payto))["amount"] == 1000
            continue
        with pytest.raises(MoneyError, match="not what is asked, not paid"):
            await wallet.quote(payto)


def melting(bolt11: str) -> dict[str, Any]:
    """A payment flow whose melt was sent: its fate is its quote's."""
    return {
        "kind": "pay",
        "mint": "http://mint.test",
        "method": "bolt11",
        "invoice": bolt11,
        "quote": "q",
        "amount": 100,
        "fee_reserve": 2,
        "ecash": 102,
        "input_fee": 0,
        "proofs": [],
        "melted": True,
        "melts": 1,
        "blanks": [],
        "blank_secrets": [],
        "refund_to": "",
    }


async def test_paid_is_shown_with_its_proof_or_said_to_have_none(tmp_path: Path) -> None:
    bolt11, preimage = invoice(100)
    for given, shown in (
        (preimage, f"preimage {preimage}"),
        ("00" * 32, "gave no preimage of the invoice's hash"),
        (None, "gave no preimage of the invoice's hash"),
    ):
        paid: dict[str, Any] = {"quote": "q", "state": "PAID", "payment_preimage": given}
        paid["change"] = []
        answer = Mint({"/v1/melt/quote": lambda _, paid=paid: paid})  # type: ignore[misc]
        wallet = flows(tmp_path / str(given)[:4], answer)
        flow = melting(bolt11)
        wallet.doc.flows.append(flow)
        [line] = await wallet.resume(flow)
        assert "PAID" in line and shown in line, line
        assert flow["preimage"] == (preimage if given == preimage else None)


async def test_a_payment_whose_state_the_mint_cannot_tell_now_is_pending(tmp_path: Path) -> None:
    """The melt was sent; asked its quote's state, the mint answers 503 or 429: the
    payment may complete yet (it was said to have failed: `wallet pay` exited 1)."""
    bolt11, _ = invoice(100)
    for status in (503, 429):

        def down(_: Any, status: int = status) -> Any:
            raise MintError(status, 0, "not now")

        wallet = flows(tmp_path / str(status), Mint({"/v1/melt/quote": down}))
        flow = melting(bolt11)
        wallet.doc.flows.append(flow)
        [line] = await wallet.resume(flow)
        assert "PENDING" in line and flow in wallet.doc.flows, line
        assert "state" not in flow  # `wallet pay` exits 3: pending
