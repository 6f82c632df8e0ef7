"""A wallet's client of a Cashu mint over HTTP (this project's mint or any other): keys,
mint and melt quotes, minting, swapping, state checks; every signature's DLEQ proof
checked (``constellation.ecash.client``). The wallet's deposits and withdrawals
(``services.wallet_money``), the tests and ``bench/mint.py`` use it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
from coincurve import PublicKey

from constellation.crypto import bdhke
from constellation.ecash import client
from constellation.ecash.keyset import ecash_for, input_fee, parse_keys
from constellation.keys import SigningKey
from constellation.protocol import cashu as nut


class MintError(RuntimeError):
    """A mint's refusal: its NUT code and detail."""

    def __init__(self, status: int, code: int, detail: str) -> None:
        super().__init__(f"[{code}] {detail} (HTTP {status})")
        self.status = status
        self.code = code

    @property
    def final(self) -> bool:
        """A refusal of the request itself (HTTP 400: a NUT error): not an outage, an
        overload or a rate limit, after which the same request may yet go through."""
        return self.status == 400


class MintClient:
    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url.rstrip("/")
        self.s = session
        self.keys: dict[str, dict[int, PublicKey]] = {}
        self.fees: dict[str, int] = {}  # each keyset's input fee (ppk)
        self.active = ""  # the active sat keyset

    async def call(
        self, path: str, body: Any = None, timeout_s: float | None = None
    ) -> tuple[int, Any]:
        """(HTTP status, JSON body) of a GET, or of a POST of ``body``; within
        ``timeout_s`` where given, else the session's timeout."""
        limit = aiohttp.ClientTimeout(total=timeout_s) if timeout_s is not None else None
        if body is None:
            async with self.s.get(self.url + path, timeout=limit) as r:
                return r.status, await r.json()
        headers = {"Content-Type": "application/json"}
        data = nut.encode(body)
        async with self.s.post(self.url + path, data=data, headers=headers, timeout=limit) as r:
            return r.status, await r.json()

    async def ok(self, path: str, body: Any = None, timeout_s: float | None = None) -> Any:
        status, doc = await self.call(path, body, timeout_s)
        if status != 200:
            raise MintError(status, int(doc.get("code", 0)), str(doc.get("detail", doc)))
        return doc

    async def load(self) -> None:
        """The mint's keysets, their keys and input fees, and which one is active."""
        for ks in (await self.ok("/v1/keys"))["keysets"]:
            self.keys[ks["id"]] = parse_keys(ks["keys"])
            if ks["active"] and ks["unit"] == "sat":
                self.active = ks["id"]
        for ks in (await self.ok("/v1/keysets"))["keysets"]:
            self.fees[ks["id"]] = int(ks.get("input_fee_ppk", 0))
            if ks["id"] not in self.keys:  # retired: ecash of it is still taken
                [found] = (await self.ok(f"/v1/keys/{ks['id']}"))["keysets"]
                self.keys[ks["id"]] = parse_keys(found["keys"])

    def input_fee(self, proofs: Sequence[nut.Proof]) -> int:
        """What spending ``proofs`` costs at this mint (NUT-02), in sat."""
        return input_fee([self.fees[p.id] for p in proofs])

    def inputs_for(self, amount: int) -> int:
        """The ecash of the active keyset that pays ``amount`` and its own input fee."""
        return ecash_for(amount, self.fees[self.active])

    def unblind(
        self,
        docs: Sequence[dict[str, Any]],
        outputs: Sequence[nut.BlindedMessage],
        secrets: Sequence[client.Secret],
        change: bool = False,
    ) -> list[nut.Proof]:
        """``client.unblind`` of the signatures in a mint's answer."""
        sigs = [nut.BlindSignature(**{**d, "dleq": nut.Dleq(**d["dleq"])}) for d in docs]
        return client.unblind(sigs, list(outputs), list(secrets), self.keys, change)

    async def mint_quote(self, amount: int, key: SigningKey | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"amount": amount, "unit": "sat"}
        if key is not None:
            body["pubkey"] = "02" + key.pubkey.hex()
        doc: dict[str, Any] = await self.ok("/v1/mint/quote/bolt11", body)
        return doc

    async def wait_paid(self, quote: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while (await self.ok(f"/v1/mint/quote/bolt11/{quote}"))["state"] != "PAID":
            if time.monotonic() > deadline:
                raise TimeoutError(f"mint quote {quote} not paid after {timeout_s} s")
            await asyncio.sleep(0.05)

    async def mint(
        self, quote: str, amounts: Sequence[int], key: SigningKey | None = None
    ) -> list[nut.Proof]:
        """Ecash of ``amounts`` for a paid quote (signed by ``key`` where it is locked)."""
        outputs, secrets = client.outputs_of(amounts, self.active)
        body: dict[str, Any] = {"quote": quote, "outputs": outputs}
        if key is not None:
            body["signature"] = client.sign_mint_request(key, quote, outputs)
        doc = await self.ok("/v1/mint/bolt11", body)
        return self.unblind(doc["signatures"], outputs, secrets)

    async def swap(self, inputs: Sequence[nut.Proof], amounts: Sequence[int]) -> list[nut.Proof]:
        outputs, secrets = client.outputs_of(amounts, self.active)
        doc = await self.ok("/v1/swap", {"inputs": list(inputs), "outputs": outputs})
        return self.unblind(doc["signatures"], outputs, secrets)

    async def restore(
        self, outputs: Sequence[nut.BlindedMessage], secrets: Sequence[client.Secret]
    ) -> list[nut.Proof]:
        """NUT-09: the signatures the mint holds for ``outputs``, unblinded, each of the
        amount asked; refused unless it signed every one (a lost reply is answered from
        what it stored)."""
        found = await self.signed(outputs, secrets)
        if len(found) != len(outputs):
            raise MintError(200, 0, "the mint holds no signature of some outputs")
        for place, output in enumerate(outputs):
            if found[place].amount != output.amount:
                raise client.BadSignature(
                    f"a signature of {found[place].amount} for an output of {output.amount}"
                )
        return [found[place] for place in range(len(outputs))]

    async def signed(
        self, outputs: Sequence[nut.BlindedMessage], secrets: Sequence[client.Secret]
    ) -> dict[int, nut.Proof]:
        """NUT-09: the proofs of the signatures the mint holds for any of ``outputs``, by
        their place in ``outputs``, each of the amount the mint signed (a wallet restored
        from its words knows its outputs, not their amounts)."""
        doc = await self.ok("/v1/restore", {"outputs": list(outputs)})
        places = {o.B_: place for place, o in enumerate(outputs)}
        if len(doc["outputs"]) != len(doc["signatures"]):
            raise client.BadSignature("the mint's restore names outputs and signatures unpaired")
        found = {}
        for output, signature in zip(doc["outputs"], doc["signatures"], strict=True):
            place = places.get(output["B_"])
            if place is None or place in found:
                raise client.BadSignature("the mint's restore answers for an output not asked")
            [found[place]] = self.unblind(
                [signature], [outputs[place]], [secrets[place]], change=True
            )
        return found

    async def states(self, proofs: Sequence[nut.Proof]) -> list[str]:
        ys = [bdhke.hash_to_curve(p.secret.encode()).format().hex() for p in proofs]
        doc = await self.ok("/v1/checkstate", {"Ys": ys})
        return [s["state"] for s in doc["states"]]
