"""Money in and out of the wallet through its operator's Cashu mint.

A deposit: the mint quotes an invoice (locked to a key of the wallet, NUT-20); once it is
paid, the wallet mints ecash for it and redeems the ecash into an L3 coin at a fresh
address of its own. A payment of a BOLT11 invoice: the wallet pays L3 coins to the mint
for ecash (a withdrawal), and melts the ecash to the invoice; what the Lightning fee
reserve did not need comes back as change (NUT-08) and is redeemed into a coin again.
On-chain (NUT-30) alike: a deposit sends bitcoin to an address of the guild's, which the
mint credits after confirmations (any amount; the flow waits as long as it takes), and a
Bitcoin address is paid by a melt the guild signs, the unused miner fee reserve back.

Each flow is a record in the wallet file, written before every request it sends, so a
crash, a lost reply or a payment whose fate is not known yet is taken up again by the
next wallet command (``Flows.resume``). Every request it repeats is idempotent at the
mint: the same outputs get the same signatures (NUT-09 restore), the same proofs redeem
into the same coin, and a melt's state is asked, never guessed.

The outputs' secrets come from the wallet's words (NUT-13), so a wallet file that is lost
loses no ecash: ``wallet restore`` (and ``wallet rescan``) makes the outputs again, asks
the mint which it signed (NUT-09) and which of those are unspent (NUT-07), and redeems
them into a coin (``Flows.recover``).
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import msgspec
import segno
from bolt11 import decode as decode_bolt11

from constellation.address import Network, encode_address
from constellation.ecash import client
from constellation.ecash import mint as m
from constellation.ecash.keyset import split
from constellation.ecash.mint import BOLT11, ONCHAIN
from constellation.keys import SigningKey
from constellation.lightning import preimage_of
from constellation.payto import Kind, PayTo, parse
from constellation.protocol import cashu as nut
from constellation.tx import decode_transaction
from constellation.wallet import GapScan, seed_of
from services.api_client import Gateway, GatewayError
from services.ecash.client import MintClient, MintError
from services.runtime import ConfigError
from services.wallet import (
    PENDING_EXIT,
    WalletFile,
    gateway_of,
    send,
    unspent,
    wallet_command,
)

MINT_TIMEOUT = aiohttp.ClientTimeout(total=30)
EXPIRED_AFTER_S = 3600  # past its expiry, as this clock says: an unpaid deposit's invoice
GIVE_UP_S = 600  # after a withdrawal's unclear refusal, until the ledger's word is final
MELTS = 3  # a melt with no clear answer is sent again, up to this many times in all
ONCHAIN_WATCH_S = 7 * 86400  # past its quote's expiry: an on-chain deposit's address
RESTORE_BATCH = 100  # outputs a NUT-09 restore asks about at once (NUT-13's batch)
RESTORE_GAP = 3 * RESTORE_BATCH  # NUT-13: three batches in a row that the mint never signed
# A melt's blank outputs (NUT-08): one for each bit of its fee reserve, at most. They
# follow its withdrawal's outputs, and the mint signs them only as the melt settles: a
# restore moves the counter past as many, where a melt in flight may have them.
MAX_BLANKS = 64


class MoneyError(RuntimeError):
    """A flow that cannot go on (the mint refused it; nothing of the wallet's is lost)."""


def _secrets(flow: dict[str, Any], name: str) -> list[client.Secret]:
    return [client.Secret(s, int(r, 16)) for s, r in flow[name]]


def _keep_secrets(secrets: list[client.Secret]) -> list[list[str]]:
    return [[s.secret, format(s.r, "x")] for s in secrets]


def _proofs(docs: list[Any]) -> list[nut.Proof]:
    return msgspec.convert(docs, list[nut.Proof])


def _docs(proofs: list[nut.Proof]) -> list[Any]:
    return msgspec.to_builtins(proofs)  # type: ignore[no-any-return]


def qr(text: str) -> str:
    """``text`` as a QR code drawn with block characters, for a terminal."""
    out = io.StringIO()
    segno.make(text.upper() if text.startswith("ln") else text, error="l").terminal(
        out=out, compact=True
    )
    return out.getvalue()


@dataclass
class Flows:
    """The wallet's flows through the mint at ``mint``'s URL."""

    doc: WalletFile
    path: Path
    gw: Gateway
    mint: MintClient
    out: TextIO
    wait_s: float = 60.0  # for a melt's answer; then its quote's state is asked

    def _save(self) -> None:
        self.doc.save(self.path)

    def _give_up(self, flow: dict[str, Any], why: str) -> None:
        """The flow leaves those taken up, into the wallet file's archive, whole."""
        self.doc.flows.remove(flow)
        self.doc.archive.append({**flow, "given_up": why, "given_up_at": time.time()})

    def say(self, line: str) -> None:
        print(line, file=self.out)

    async def _l3_address(self) -> str:
        """A fresh receive address of the wallet, in the mint's ledger."""
        info = await self.mint.ok("/v1/l3/info")
        self.doc.learn(await self.gw.totals())
        if self.doc.ledger_id and self.doc.ledger_id != info["ledger_id"]:
            raise MoneyError(
                f"the mint at {self.mint.url} bridges to ledger {info['ledger_id']}, this"
                f" wallet's coins are in {self.doc.ledger_id}: use its operator's mint"
            )
        return self.doc.next_address()

    # -- deposits ------------------------------------------------------------------

    async def deposit(self, amount_sat: int, onchain: bool = False) -> dict[str, Any]:
        """A deposit flow for ``amount_sat``: the invoice to pay (or, ``onchain``, the
        address of the guild's to send it to), recorded."""
        key = SigningKey(os.urandom(32))
        least = 1
        if onchain:
            info = await self.mint.ok("/v1/info")
            methods = info.get("nuts", {}).get("4", {}).get("methods", [])
            least = next((d.get("min_amount") or 1 for d in methods if d["method"] == ONCHAIN), 1)
            if amount_sat < least:  # NUT-30: an output of less is never credited
                raise MoneyError(
                    f"the mint credits no on-chain deposit under {least} sat (each output on"
                    " its own): nothing was asked"
                )
            body = {"unit": "sat", "pubkey": "02" + key.pubkey.hex()}
            quote = await self.mint.ok("/v1/mint/quote/onchain", body)
        else:
            quote = await self.mint.mint_quote(amount_sat, key)
        flow = {
            "kind": "deposit",
            "mint": self.mint.url,  # taken up there, whatever mint later commands name
            "method": ONCHAIN if onchain else BOLT11,
            "quote": quote["quote"],
            "request": quote["request"],
            "amount": amount_sat,
            "expiry": quote["expiry"],
            "key": key.secret.hex(),
            "address": await self._l3_address(),
            "min_amount": least,
        }
        self.doc.flows.append(flow)
        self._save()
        return flow

    async def _deposit(self, flow: dict[str, Any]) -> str:
        """A deposit, one step further: waiting, done, or expired."""
        if "proofs" not in flow:
            method = flow.get("method", BOLT11)
            quote = await self.mint.ok(f"/v1/mint/quote/{method}/{flow['quote']}")
            if method == ONCHAIN:  # what the chain credited and was not issued
                state = m.PAID if quote["amount_paid"] > quote["amount_issued"] else m.UNPAID
                if "outputs" not in flow and state == m.PAID:
                    flow["amount"] = quote["amount_paid"] - quote["amount_issued"]
            else:
                state = quote["state"]
            if state == m.UNPAID and "outputs" not in flow:
                return "waiting"
            if "outputs" not in flow:  # the outputs are kept before they are sent
                outputs, secrets = self.doc.outputs(split(flow["amount"]), self.mint.active)
                flow["outputs"] = msgspec.to_builtins(outputs)
                flow["secrets"] = _keep_secrets(secrets)
                self._save()
            outputs = msgspec.convert(flow["outputs"], list[nut.BlindedMessage])
            secrets = _secrets(flow, "secrets")
            if state == m.PAID:
                key = SigningKey(bytes.fromhex(flow["key"]))
                body = {"quote": flow["quote"], "outputs": outputs}
                body["signature"] = client.sign_mint_request(key, flow["quote"], outputs)
                try:
                    doc = await self.mint.ok(f"/v1/mint/{method}", body)
                    proofs = self.mint.unblind(doc["signatures"], outputs, secrets)
                except MintError as exc:  # refused: signed before, and the reply lost?
                    try:
                        proofs = await self.mint.restore(outputs, secrets)
                    except MintError:
                        raise exc from None
            else:  # issued to these outputs, before a crash or a lost reply
                proofs = await self.mint.restore(outputs, secrets)
            flow["proofs"] = _docs(proofs)
            self._save()
        return await self._redeem(flow, _proofs(flow["proofs"]))

    async def _redeem(self, flow: dict[str, Any], proofs: list[nut.Proof]) -> str:
        """Ecash into an L3 coin at the flow's address: done, or pending at the ledger."""
        doc = await self.mint.ok("/v1/l3/redeem", {"inputs": proofs, "address": flow["address"]})
        if doc["state"] != "ISSUED":
            return "pending"
        flow["coin"] = doc["coin_id"]
        flow["credited_msat"] = doc["value_msat"]
        return "done"

    # -- paying an invoice ------------------------------------------------------------

    async def quote(self, payto: PayTo, amount_sat: int = 0) -> dict[str, Any]:
        """A payment flow for an invoice (or ``amount_sat`` to a Bitcoin address, on
        chain): the mint's quote and every fee, not started."""
        if payto.kind is Kind.ONCHAIN:
            body: dict[str, Any] = {"request": payto.target, "unit": "sat", "amount": amount_sat}
            quote = await self.mint.ok("/v1/melt/quote/onchain", body)
            quote["fee_reserve"] = quote["fee_options"][0]["fee_reserve"]
            asked = amount_sat
        else:
            quote = await self.mint.ok(
                "/v1/melt/quote/bolt11", {"request": payto.target, "unit": "sat"}
            )
            asked = -(-(payto.amount_msat or 0) // 1000)  # what the invoice asks, in sat
        # The mint's word, checked: it names what it pays, and the wallet pays it the
        # amount (the fee reserve is shown apart, and bounded by the user's maximum)
        if str(quote.get("request")).lower() != payto.target or quote["amount"] != asked:
            raise MoneyError(
                f"the mint quoted {quote['amount']} sat to {str(quote.get('request'))[:40]}…"
                f" for {asked} sat to {payto.target[:40]}…: not what is asked, not paid"
            )
        ecash = self.mint.inputs_for(quote["amount"] + quote["fee_reserve"])
        return {
            "kind": "pay",
            "mint": self.mint.url,  # taken up there, whatever mint later commands name
            "method": ONCHAIN if payto.kind is Kind.ONCHAIN else BOLT11,
            "invoice": payto.target,
            "quote": quote["quote"],
            "amount": quote["amount"],
            "fee_reserve": quote["fee_reserve"],
            "ecash": ecash,  # what the wallet buys: amount, reserve, the melt's input fee
            "input_fee": ecash - quote["amount"] - quote["fee_reserve"],
        }

    async def pay(self, flow: dict[str, Any], coins: Any, fee_msat: int) -> None:
        """Start a payment flow: the L3 transaction buying its ecash, recorded first."""
        info = await self.mint.ok("/v1/l3/info")
        here = bytes.fromhex(info["ledger_id"])
        if self.doc.ledger_id and self.doc.ledger_id != info["ledger_id"]:
            raise MoneyError(f"the mint at {self.mint.url} bridges to another ledger")
        outputs, secrets = self.doc.outputs(split(flow["ecash"]), self.mint.active)
        key = m.withdrawal_key(bytes.fromhex(info["key"]), [bytes.fromhex(o.B_) for o in outputs])
        network = Network.from_name(self.doc.network)
        to = encode_address(key, network, here)
        tx = self.doc.wallet().pay(coins, to, flow["ecash"] * 1000, fee_msat, here=here)
        if len(tx.outputs) > 1:
            self.doc.change += 1
        flow["tx"] = tx.encode().hex()
        flow["outputs"] = msgspec.to_builtins(outputs)
        flow["secrets"] = _keep_secrets(secrets)
        blanks, blank_secrets = self.doc.outputs(  # as many as the change may need
            [1] * max(1, (flow["ecash"] - flow["amount"]).bit_length()), self.mint.active
        )
        flow["blanks"] = msgspec.to_builtins(blanks)
        flow["blank_secrets"] = _keep_secrets(blank_secrets)
        flow["refund_to"] = self.doc.next_address()
        self.doc.flows.append(flow)
        self._save()

    async def _pay(self, flow: dict[str, Any]) -> str:
        """A payment, one step further: paid, pending, or failed (and refunded)."""
        if "proofs" not in flow:
            outputs = msgspec.convert(flow["outputs"], list[nut.BlindedMessage])
            flow["tries"] = flow.get("tries", 0) + 1
            self._save()
            try:
                body = {"tx": flow["tx"], "outputs": outputs}
                doc = await self.mint.ok("/v1/l3/withdraw", body)
            except MintError as exc:
                return await self._not_withdrawn(flow, exc)
            signed = self.mint.unblind(doc["signatures"], outputs, _secrets(flow, "secrets"))
            flow["proofs"] = _docs(signed)
            self._save()
        if "melted" not in flow:
            flow["melted"] = True  # from here, its fate is the quote's: asked, not guessed
            self._save()
            body = {
                "quote": flow["quote"],
                "inputs": _proofs(flow["proofs"]),
                "outputs": msgspec.convert(flow["blanks"], list[nut.BlindedMessage]),
            }
            method = flow.get("method", BOLT11)
            if method == ONCHAIN:
                body["fee_index"] = 0
            flow["melts"] = flow.get("melts", 0) + 1
            self._save()
            try:
                await self.mint.ok(f"/v1/melt/{method}", body, self.wait_s)
            except MintError as exc:
                if exc.status == 400 and exc.code not in (m.PENDING, m.QUOTE_PENDING):
                    flow["failed"] = str(exc)  # refused, or its payment failed: ecash free
                # else no answer (rate limited, unavailable; the proofs pending under
                # this very melt): the quote's state says what became of it
            except (aiohttp.ClientError, TimeoutError):
                pass  # the reply is lost: the quote's state says what became of it
        return await self._settled(flow)

    async def _not_withdrawn(self, flow: dict[str, Any], exc: MintError) -> str:
        """A withdrawal the mint did not answer with ecash. Refused at the first try
        (HTTP 400), the ledger took nothing: the flow goes. Else its coins may be taken
        (a lost reply, then a refused retry; a ledger slow to commit): the flow stays and
        is asked again, until the ledger says it took the transaction (then the mint's
        answer is due) or, ``GIVE_UP_S`` on, that it did not (then nothing was spent)."""
        if exc.status == 400 and flow["tries"] == 1:
            self.doc.flows.remove(flow)
            raise MoneyError(f"the mint refused the withdrawal: {exc}; nothing was spent")
        flow["refused"] = str(exc)
        first = flow.setdefault("refused_at", time.time())
        txid = decode_transaction(bytes.fromhex(flow["tx"])).txid.hex()
        try:
            await self.gw.get(f"/v1/tx/{txid}")  # committed, or on its way ("pending")
            return "withdrawing"
        except GatewayError as gone:
            # only "not found" for good says it did not commit: not while the index is
            # behind, nor where a submission of it timed out (it may still commit)
            if gone.status != 404 or not gone.final:
                raise
        if time.time() - first >= GIVE_UP_S:
            self._give_up(flow, f"the ledger never took the withdrawal: {exc}")
            raise MoneyError(f"the ledger never took the withdrawal ({exc}): nothing was spent")
        return "withdrawing"

    async def _settled(self, flow: dict[str, Any]) -> str:
        quote = await self.mint.ok(f"/v1/melt/quote/{flow.get('method', BOLT11)}/{flow['quote']}")
        if quote["state"] == m.MELT_PENDING:
            if quote.get("outpoint"):  # on-chain: sent, PAID once confirmed (NUT-30)
                flow["outpoint"] = quote["outpoint"]
            return "pending"
        if quote["state"] == m.MELT_PAID:
            if flow.get("method") == ONCHAIN:
                flow["preimage"] = quote.get("outpoint")
            else:  # the proof of payment, where it is one: the mint's word is no proof
                paid_hash = bytes.fromhex(decode_bolt11(flow["invoice"]).payment_hash)
                preimage = preimage_of(quote.get("payment_preimage"), paid_hash)
                flow["preimage"] = None if preimage is None else preimage.hex()
            signatures = quote.get("change") or []
            n = len(signatures)
            blanks = msgspec.convert(flow["blanks"], list[nut.BlindedMessage])[:n]
            secrets = _secrets(flow, "blank_secrets")[:n]
            change = self.mint.unblind(signatures, blanks, secrets, change=True)
            kept = self.mint.input_fee(_proofs(flow["proofs"]))  # the mint's, for the melt
            flow["fee_paid"] = flow["ecash"] - flow["amount"] - kept - sum(p.amount for p in change)
            if change:
                flow["change"] = _docs(change)
            return "paid"
        if "failed" not in flow:  # not paid, not in flight, and no refusal heard
            if flow.get("melts", MELTS) < MELTS:  # it may not have reached the mint: again
                del flow["melted"]
                return "pending"
            flow["failed"] = "the payment was not made"
        return "failed"

    async def _refund(self, flow: dict[str, Any], name: str) -> str:
        """Ecash the flow holds (its unspent proofs, or change) back into an L3 coin."""
        proofs = _proofs(flow[name])
        if sum(p.amount for p in proofs) <= self.mint.input_fee(proofs):
            self.doc.ecash += flow.pop(name)  # worth less than redeeming it costs: kept
            return "done"
        return await self._redeem({**flow, "address": flow["refund_to"]}, proofs)

    # -- a lost wallet file's ecash ---------------------------------------------------

    async def recover(self) -> str:
        """NUT-13 restore: the wallet's outputs of each of the mint's keysets made again
        and asked of the mint (NUT-09) until ``RESTORE_GAP`` in a row were never signed;
        those it signed that are unspent (NUT-07) and not held by the wallet already
        become a flow that redeems them (``_refund``), and each keyset's counter moves
        past the last one signed (the mint signs an output once), and past the blank
        outputs a melt in flight may have after it (``MAX_BLANKS``: reused, its change
        would be lost). Ecash reserved by a payment in flight when the file was lost is
        not unspent yet: said, and found by a later rescan once the payment failed (or
        its change was signed)."""
        seed = seed_of(self.doc.mnemonic)
        held = _held(self.doc)
        found: list[nut.Proof] = []
        pending = 0
        for keyset_id in sorted(self.mint.keys):
            if keyset_id[:2] not in client.DERIVED_VERSIONS:
                continue  # the wallet never made outputs of it
            scan = GapScan(RESTORE_GAP, RESTORE_BATCH)
            while batch := scan.next():
                outputs, secrets = client.derived_outputs(  # the amounts are the mint's to say
                    [1] * len(batch), keyset_id, seed, batch.start
                )
                signed = await self.mint.signed(outputs, secrets)
                for place in signed:
                    scan.used(batch[place])
                proofs = [p for p in signed.values() if p.secret not in held]
                states = await self.mint.states(proofs) if proofs else []
                for proof, state in zip(proofs, states, strict=True):
                    if state == "UNSPENT":  # NUT-07's states
                        found.append(proof)
                    elif state == "PENDING":
                        pending += proof.amount
            if scan.end + MAX_BLANKS > self.doc.counters.get(keyset_id, 0):
                self.doc.counters[keyset_id] = scan.end + MAX_BLANKS
        said = f"ecash at {self.mint.url}: {sum(p.amount for p in found)} sat unspent recovered"
        if pending:
            said += (
                f"; {pending} sat reserved by a payment in flight (`constellation wallet"
                " rescan` finds what comes back of it once it is settled)"
            )
        if found:
            self.doc.flows.append(
                {
                    "kind": "recovered",
                    "mint": self.mint.url,
                    "amount": sum(p.amount for p in found),
                    "proofs": _docs(found),
                    "refund_to": self.doc.next_address(),
                }
            )
        self._save()
        return said

    # -- taking flows up again ------------------------------------------------------

    async def resume(self, only: dict[str, Any] | None = None) -> list[str]:
        """Every flow in the wallet file (or just ``only``) taken as far as it goes;
        what each came to, in words. Finished flows leave the file."""
        said = []
        for flow in list(self.doc.flows) if only is None else [only]:
            if _mint_of(flow, self.doc) != self.mint.url:
                continue  # another mint's: taken up with it (``money_command``)
            try:
                said.append(await self._step(flow))
            except (aiohttp.ClientError, TimeoutError) as exc:
                said.append(f"{_name(flow)}: the mint is not reachable ({exc}); tried again later")
            except (MintError, GatewayError) as exc:
                if not exc.final:  # an outage: what became of the flow is not known yet
                    said.append(f"{_name(flow)}: PENDING: {exc}; asked again later")
                elif only is not None:
                    raise
                else:
                    said.append(f"{_name(flow)}: {exc}")  # the others go on all the same
            except MoneyError as exc:
                if only is not None:
                    raise
                said.append(f"{_name(flow)}: {exc}")
            except Exception as exc:  # a bad answer (a signature that does not check)
                if only is not None:
                    raise
                said.append(f"{_name(flow)}: {type(exc).__name__}: {exc}; kept, tried again later")
            finally:
                self._save()
        return said

    async def _step(self, flow: dict[str, Any]) -> str:
        if flow["kind"] == "deposit":
            return await self._deposit_step(flow)
        if flow["kind"] == "recovered":
            try:
                refund = await self._refund(flow, "proofs")
            except MintError as exc:
                if exc.code != m.SPENT:
                    raise
                # spent since the restore found it unspent (by another copy of the wallet):
                # what is left of it is found by the next rescan, once the flow is gone
                self.doc.flows.remove(flow)
                return f"{_name(flow)}: spent meanwhile, by another copy of this wallet?"
            if refund == "pending":
                return f"{_name(flow)}: into a coin: pending"
            self.doc.flows.remove(flow)
            if "proofs" not in flow:
                return f"{_name(flow)}: kept as ecash, worth less than a coin's fee"
            return f"{_name(flow)}: back as a coin at {flow['refund_to']}"
        state = flow.get("state") or await self._pay(flow)
        if state in ("paid", "failed"):
            flow["state"] = state
            name = "change" if state == "paid" else "proofs"
            try:
                refund = await self._refund(flow, name) if name in flow else "done"
            except MintError as exc:
                if state == "failed" and exc.code in (m.PENDING, m.SPENT):
                    # a melt took them after all (one whose answer was lost): its quote
                    # says what became of it
                    del flow["state"], flow["failed"]
                    return _paid_line(flow, "pending")
                raise
            if refund == "pending":
                return f"{_name(flow)}: {state}; its ecash back into a coin: pending"
            self.doc.flows.remove(flow)
        return _paid_line(flow, state)

    async def _deposit_step(self, flow: dict[str, Any]) -> str:
        state = await self._deposit(flow)
        if flow.get("method") == ONCHAIN:
            return self._onchain_round(flow, state)
        if state == "waiting" and flow["expiry"] + EXPIRED_AFTER_S <= time.time():
            self._give_up(flow, "the invoice expired unpaid")  # its quote's key kept
            return f"{_name(flow)}: the invoice expired unpaid; nothing was deposited"
        if state == "done":
            self.doc.flows.remove(flow)
            return _credited(flow)
        return f"{_name(flow)}: {state}"

    def _onchain_round(self, flow: dict[str, Any], state: str) -> str:
        """An address may be paid more than once, and late: each credit is minted and
        redeemed in a round of its own, and the flow (with its quote's key) is kept
        ``ONCHAIN_WATCH_S`` from its start."""
        if state == "done":
            said = _credited(flow)
            flow["credited_total"] = flow.get("credited_total", 0) + flow["credited_msat"]
            for name in ("outputs", "secrets", "proofs", "coin", "credited_msat"):
                flow.pop(name)
            flow["address"] = self.doc.next_address()  # the next round's coin
            return said
        if state == "waiting" and flow["expiry"] + ONCHAIN_WATCH_S <= time.time():
            self._give_up(flow, "no longer watched")
            return (
                f"{_name(flow)}: no longer watched; {flow.get('credited_total', 0)} msat credited"
            )
        return f"{_name(flow)}: {state}"


def _mint_of(flow: dict[str, Any], doc: WalletFile) -> str:
    """The URL of the mint a flow goes through (the wallet's, for a flow that names none)."""
    return str(flow.get("mint") or doc.mint).rstrip("/")


def _credited(flow: dict[str, Any]) -> str:
    return (
        f"deposit of {flow['amount']} sat: credited {flow['credited_msat']} msat"
        f" as coin {flow['coin']} at {flow['address']}"
    )


def _held(doc: WalletFile) -> set[str]:
    """The secrets of the ecash the wallet holds, or may yet be given by its flows: a
    rescan leaves those to their flows and to the ecash kept."""
    held = {p["secret"] for p in doc.ecash}
    for flow in doc.flows:
        held |= {s for name in ("secrets", "blank_secrets") for s, _ in flow.get(name, [])}
        held |= {p["secret"] for name in ("proofs", "change") for p in flow.get(name, [])}
    return held


def _name(flow: dict[str, Any]) -> str:
    if flow["kind"] == "recovered":
        return f"ecash recovered ({flow['amount']} sat)"
    if flow["kind"] == "deposit":
        if flow.get("method") == ONCHAIN and "outputs" not in flow:
            return f"on-chain deposit to {flow['request']} (quote {flow['quote']})"
        return f"deposit of {flow['amount']} sat (quote {flow['quote']})"
    return f"payment of {flow['amount']} sat (quote {flow['quote']})"


def _paid_line(flow: dict[str, Any], state: str) -> str:
    if state == "paid":
        change = sum(p["amount"] for p in flow.get("change", []))
        back = f"; {change} sat of the fee reserve back as a coin" if change else ""
        if flow.get("method") == ONCHAIN:
            return (
                f"{_name(flow)}: PAID on-chain, miner fee {flow['fee_paid']} sat{back};"
                f" outpoint {flow['preimage']}"
            )
        proof = (
            f"preimage {flow['preimage']}"
            if flow["preimage"]
            else "the mint says so, and gave no preimage of the invoice's hash to prove it"
        )
        return f"{_name(flow)}: PAID, Lightning fee {flow['fee_paid']} sat{back}; {proof}"
    if state == "failed":
        return f"{_name(flow)}: FAILED ({flow['failed']}); its value is back as a coin"
    if state == "withdrawing":
        return (
            f"{_name(flow)}: PENDING: the mint has not given its ecash yet ({flow['refused']});"
            " asked again by `constellation wallet balance`, nothing is lost"
        )
    if flow.get("method") == ONCHAIN:
        sent = f"sent on-chain as outpoint {flow['outpoint']}" if flow.get("outpoint") else ""
        return (
            f"{_name(flow)}: PENDING: {sent or 'the guild signs and sends it'}, PAID once"
            " confirmed; the ecash stays reserved (`constellation wallet balance` follows it)"
        )
    return (
        f"{_name(flow)}: PENDING: its fate is not known yet; the ecash stays reserved"
        " (`constellation wallet balance` follows it)"
    )


async def money_command(args: Any, out: TextIO) -> int:
    """``constellation wallet deposit|pay|balance``: the flows through the mint first
    (a balance takes up those in flight), then the command; ``restore|rescan``: the keys
    in use, then the ecash at the mint (``_restore``)."""
    if args.wallet_command in ("restore", "rescan"):
        return await _restore(args, out)
    doc = WalletFile.load(args.file)
    url = getattr(args, "mint", "") or doc.mint
    doc.mint = doc.mint or url  # remembered: its flows are taken up there later
    if args.wallet_command == "balance" and not doc.flows:
        return await wallet_command(args, out)
    async with aiohttp.ClientSession(timeout=MINT_TIMEOUT) as session:
        gw = gateway_of(doc, session, args.gateway, "")
        flows = Flows(doc, args.file, gw, MintClient(url, session), out)
        flows.wait_s = getattr(args, "wait", flows.wait_s)
        if args.wallet_command == "pay":
            payto = parse(args.thing, Network.from_name(doc.network))
            if payto.kind is Kind.L3:
                return await _pay_address(flows, payto, args)
        if not url:
            raise ConfigError("the wallet knows no mint: `--mint URL` (its operator's)")
        try:
            await flows.mint.load()
        except (aiohttp.ClientError, TimeoutError, MintError) as exc:
            if args.wallet_command != "balance":
                raise
            # the coins are the ledger's to tell (``--via`` another member's gateway)
            flows.say(f"the mint is not reachable ({exc}): {len(doc.flows)} flows wait")
            return await wallet_command(args, out)
        if args.wallet_command == "deposit":
            return await _deposit(flows, args)
        if args.wallet_command == "pay":
            return await _pay_invoice(flows, payto, args)
        for line in await flows.resume():
            flows.say(line)
        for other in sorted({_mint_of(f, doc) for f in doc.flows} - {flows.mint.url}):
            elsewhere = Flows(doc, args.file, gw, MintClient(other, session), out)
            try:
                await elsewhere.mint.load()
            except (aiohttp.ClientError, TimeoutError, MintError) as exc:
                flows.say(f"the mint at {other} is not reachable ({exc}): its flows wait")
                continue
            for line in await elsewhere.resume():
                flows.say(line)
    return await wallet_command(args, out)


async def _restore(args: Any, out: TextIO) -> int:
    """``wallet restore|rescan``: the keys in use, found at the gateway; then the wallet's
    ecash at its mint, recovered and redeemed (or kept, where worth less than a coin's
    fee), with the flows in flight there taken up."""
    code = await wallet_command(args, out)  # the words saved (restore), the keys in use
    if code != 0:
        return code
    doc = WalletFile.load(args.file)
    url = args.mint or doc.mint
    if not url:  # a wallet file that names none never used one
        if args.wallet_command == "restore":
            print(
                "no mint named: its ecash is not looked for (`constellation wallet rescan"
                " --mint URL` does)",
                file=out,
            )
        return 0
    doc.mint = doc.mint or url
    async with aiohttp.ClientSession(timeout=MINT_TIMEOUT) as session:
        gw = gateway_of(doc, session, args.gateway, "")
        flows = Flows(doc, args.file, gw, MintClient(url, session), out)
        try:
            await flows.mint.load()
            flows.say(await flows.recover())
        except (aiohttp.ClientError, TimeoutError, MintError, client.BadSignature) as exc:
            flows.say(
                f"the mint at {url} did not say which ecash is the wallet's ({exc}):"
                " `constellation wallet rescan` asks again"
            )
            return 1
        for line in await flows.resume():
            flows.say(line)
    return 0


async def _deposit(flows: Flows, args: Any) -> int:
    flow = await flows.deposit(args.amount_sat, args.onchain)
    if args.onchain:
        shown = f"bitcoin:{flow['request']}?amount={Decimal(args.amount_sat) / 100_000_000}"
        flows.say(f"deposit {args.amount_sat} sat: send it to this address of the guild's")
        flows.say(
            f"(credited after the mint's confirmations: each output of {flow['min_amount']}"
            " sat or more sent in a week; one of less is lost)"
        )
    else:
        expiry = time.strftime("%H:%M:%S", time.localtime(flow["expiry"]))
        flows.say(f"deposit {args.amount_sat} sat: pay this invoice (it expires at {expiry})")
        shown = flow["request"]
    flows.say(shown)
    if not args.no_qr:
        flows.say(qr(shown))
    deadline = time.monotonic() + args.wait
    while True:
        [line] = await flows.resume(flow)
        if flow not in flows.doc.flows or flow.get("credited_total"):
            flows.say(line)
            return 0
        if not line.endswith("waiting") or time.monotonic() > deadline:
            flows.say(f"{line}: `constellation wallet balance` takes it up")
            return PENDING_EXIT
        await asyncio.sleep(0.5)


def _confirm(flows: Flows, args: Any, fee_msat: int) -> None:
    """Go ahead only where the user says so: at a terminal (unless ``--yes``) by
    answering, and never past ``--max-fee-msat``."""
    if args.max_fee_msat is not None and fee_msat > args.max_fee_msat:
        raise MoneyError(f"the fees may reach {fee_msat} msat, over --max-fee-msat")
    if args.yes or not sys.stdin.isatty():
        return
    if input("pay? [y/N] ").strip().lower() not in ("y", "yes"):
        raise MoneyError("not paid")


async def _pay_address(flows: Flows, payto: PayTo, args: Any) -> int:
    if args.amount_msat is None:
        raise MoneyError("an L3 address says no amount: give AMOUNT_MSAT")
    flows.say(f"pay {args.amount_msat} msat to {payto.target}; L3 fee {args.fee_msat} msat")
    _confirm(flows, args, args.fee_msat)
    doc = flows.doc
    gw = gateway_of(doc, flows.gw.session, args.gateway, args.via)
    coins = await unspent(gw, doc, args.via)
    doc.save(flows.path)
    return await send(
        gw, doc, flows.path, coins, payto.target, args.amount_msat, args.fee_msat, flows.out
    )


async def _pay_invoice(flows: Flows, payto: PayTo, args: Any) -> int:
    """An invoice paid over Lightning, or a Bitcoin address on-chain, through the mint."""
    onchain = payto.kind is Kind.ONCHAIN
    thing = "a Bitcoin address" if onchain else "the invoice"
    amount_msat = payto.amount_msat if payto.amount_msat is not None else args.amount_msat
    if amount_msat is None:
        raise MoneyError(
            f"{thing} says no amount: give AMOUNT_MSAT"
            if onchain
            else "the invoice says no amount: ask the payee for one that does"
        )
    if amount_msat % 1000:
        raise MoneyError(f"{thing} asks {amount_msat} msat: the mint pays whole sat")
    if args.amount_msat not in (None, amount_msat):
        raise MoneyError(f"{thing} asks {amount_msat} msat, not {args.amount_msat}")
    flow = await flows.quote(payto, amount_msat // 1000)
    most = (flow["fee_reserve"] + flow["input_fee"]) * 1000 + args.fee_msat
    what = f" ({payto.description})" if payto.description else ""
    if onchain:
        flows.say(f"pay {flow['amount']} sat on-chain to {payto.target}{what}")
        flows.say(f"  miner fee: at most {flow['fee_reserve']} sat (unused, it comes back)")
    else:
        flows.say(f"pay {flow['amount']} sat to invoice {payto.payment_hash[:16]}…{what}")
        flows.say(
            f"  Lightning routing fee: at most {flow['fee_reserve']} sat (unused, it comes back)"
        )
    flows.say(f"  mint input fee: {flow['input_fee']} sat; L3 fee: {args.fee_msat} msat")
    flows.say(f"  at most {flow['amount'] * 1000 + most} msat in all, {most} of it fees")
    _confirm(flows, args, most)
    coins = await unspent(flows.gw, flows.doc)
    await flows.pay(flow, coins, args.fee_msat)
    [line] = await flows.resume(flow)
    flows.say(line)
    return {"paid": 0, "failed": 1}.get(flow.get("state", ""), PENDING_EXIT)
