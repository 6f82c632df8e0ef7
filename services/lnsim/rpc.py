"""lightningd's JSON-RPC for each simulated node, on a unix socket of its own.

The wire is lightningd's (``doc/lightningd-rpc.7.md``): requests are JSON objects
written back to back with no delimiter (several may come on one connection), each
answer is one JSON object followed by two newlines; an error is
``{"code", "message", "data"}`` with lightningd's codes; an unknown method is -32601, a
request without ``jsonrpc`` 2.0 or an ``id`` is -32600. Parameters come by name or by
position, in the order of each method's schema; an unknown name is refused. Methods
and result fields are those of Core Lightning's schemas (``doc/schemas``) for the
version the simulator says it is: ``xpay`` from v24.11, ``splicein``/``spliceout``
from v26.04, the three-step ``splice_init``/``splice_update``/``splice_signed`` before;
``listpays`` without ``amount_msat`` at v24.11, as ``xpay``'s payments were listed there
(ElementsProject/lightning#7881: ``amount_sent_msat`` only; fixed in v24.11.1).

Faults (``network.Faults``): an offline node serves no socket; a lost reply is a
connection closed after the call took effect; a delay holds every reply back.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from services.lnsim.network import (
    INVALID_PARAMS,
    INVOICE_EXPIRED_DURING_WAIT,
    INVOICE_WAIT_TIMED_OUT,
    LIGHTNINGD,
    PAY_IN_PROGRESS,
    PAY_NO_SUCH_PAYMENT,
    Attempt,
    Channel,
    Invoice,
    LnError,
    Network,
    Part,
)

log = logging.getLogger("lnsim.rpc")

MAX_REQUEST = 1 << 20
Handler = Callable[["NodeServer", dict[str, Any]], Awaitable[dict[str, Any]]]


def version_tuple(version: str) -> tuple[int, int]:
    m = re.match(r"v?(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(f"not a lightningd version: {version!r}")
    return int(m.group(1)), int(m.group(2))


def msat(value: Any, name: str, allow_any: bool = False) -> int | None:
    """An amount as lightningd takes it: an integer of msat, or a string of msat, sat
    or btc (``"10msat"``, ``"10sat"``, ``"0.001btc"``); ``"any"`` where allowed."""
    if allow_any and value == "any":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"(\d+)(msat|sat)?|(\d+)\.(\d{1,11})btc|(\d+)btc", value)
        if m is not None:
            if m.group(1) is not None:
                return int(m.group(1)) * (1 if m.group(2) in (None, "msat") else 1000)
            if m.group(5) is not None:
                return int(m.group(5)) * 100_000_000_000
            whole, frac = m.group(3), m.group(4)
            return int(whole) * 100_000_000_000 + int(frac.ljust(11, "0"))
    raise LnError(INVALID_PARAMS, f"{name}: should be a millisatoshi amount: invalid token")


def sat(value: Any, name: str, allow_all: bool = False) -> int | None:
    if allow_all and value == "all":
        return None
    amount = msat(value if not isinstance(value, int) else f"{value}sat", name)
    assert amount is not None
    if amount % 1000:
        raise LnError(INVALID_PARAMS, f"{name}: should be a satoshi amount")
    return amount // 1000


def _hash(value: Any, name: str) -> bytes:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise LnError(INVALID_PARAMS, f"{name}: should be a 32 byte hex value")
    return bytes.fromhex(value)


def _str(value: Any, name: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise LnError(INVALID_PARAMS, f"{name}: should be a string")
    return value


def _uint(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise LnError(INVALID_PARAMS, f"{name}: should be an unsigned integer")
    return value


class Changes:
    """Wakes those waiting for the network to change (long polls, payments)."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait(self, timeout: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, timeout)
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)


# -- results in Core Lightning's shapes ---------------------------------------------------


def invoice_json(inv: Invoice) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "label": inv.label,
        "bolt11": inv.bolt11,
        "payment_hash": inv.payment_hash.hex(),
        "status": inv.status,
        "description": inv.description,
        "expires_at": inv.expires_at,
        "created_index": inv.created_index,
    }
    if inv.amount_msat is not None:
        doc["amount_msat"] = inv.amount_msat
    if inv.status == "paid":
        doc.update(
            pay_index=inv.pay_index,
            amount_received_msat=inv.amount_received_msat,
            paid_at=inv.paid_at,
            payment_preimage=inv.preimage.hex(),
            updated_index=inv.updated_index,
        )
    return doc


def part_json(p: Part) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "created_index": p.created_index,
        "id": p.created_index,
        "groupid": p.groupid,
        "partid": p.partid,
        "payment_hash": p.payment_hash.hex(),
        "status": p.status,
        "amount_msat": p.amount_msat,
        "amount_sent_msat": p.amount_sent_msat,
        "destination": p.destination,
        "created_at": p.created_at,
        "bolt11": p.bolt11,
    }
    if p.updated_index is not None:
        doc["updated_index"] = p.updated_index
    if p.status == "complete":
        assert p.preimage is not None
        doc.update(payment_preimage=p.preimage.hex(), completed_at=p.completed_at)
    return doc


class NodeServer:
    """Node ``name``'s socket at ``path`` (``<lightning-dir>/<network>/lightning-rpc``)."""

    def __init__(
        self, network: Network, name: str, path: Path, changes: Changes, version: str
    ) -> None:
        self.network = network
        self.name = name
        self.path = path
        self.changes = changes
        self.version = version
        self.server: asyncio.AbstractServer | None = None
        self.clients: dict[asyncio.StreamWriter, asyncio.Task[Any]] = {}
        self.calls = 0

    @property
    def node(self) -> Any:
        return self.network.nodes[self.name]

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self.server = await asyncio.start_unix_server(self._client, path=str(self.path))
        self.path.chmod(0o600)

    async def stop(self) -> None:
        """No socket any more, and the connections open are dropped (a call waiting on
        one, a held payment say, hears the connection lost, as from a dead node)."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer, task in list(self.clients.items()):
            writer.close()
            task.cancel()  # a held payment or a long poll ends with its connection
        self.path.unlink(missing_ok=True)

    async def set_online(self, online: bool) -> None:
        """An offline node serves no socket (its clients find none to connect to)."""
        self.node.faults.offline = not online
        if online and self.server is None:
            await self.start()
        elif not online:
            await self.stop()
        self.changes.notify()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = ""
        decoder = json.JSONDecoder()
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # whole characters
        task = asyncio.current_task()
        assert task is not None
        self.clients[writer] = task
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                buf += text.decode(chunk)
                if len(buf) > MAX_REQUEST:
                    return
                while buf.strip():
                    try:
                        request, end = decoder.raw_decode(buf.lstrip())
                    except json.JSONDecodeError:
                        break  # the rest of it has not arrived
                    buf = buf.lstrip()[end:]
                    answer = await self._answer(request)
                    faults = self.node.faults
                    if faults.lose_replies > 0:
                        faults.lose_replies -= 1
                        return  # the call took effect; its reply is lost
                    if faults.delay_s:
                        await asyncio.sleep(faults.delay_s)
                    if writer.is_closing():  # the client went while its call ran (it took
                        return  # effect, as lightningd's does); uvloop raises on a write
                    writer.write(json.dumps(answer).encode() + b"\n\n")
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # ``stop``: the connection is dropped. Not raised on: Python 3.11's stream
            # server asks a cancelled handler's task for its exception, which raises.
            return
        finally:
            self.clients.pop(writer, None)
            writer.close()

    async def _answer(self, request: Any) -> dict[str, Any]:
        rid = request.get("id") if isinstance(request, dict) else None
        if not isinstance(request, dict) or request.get("jsonrpc") != "2.0" or rid is None:
            return self._error(rid, LnError(-32600, "Expected jsonrpc 2.0 with an id"))
        method = request.get("method")
        handler = METHODS.get(method) if isinstance(method, str) else None
        if handler is None or not self._supports(str(method)):
            return self._error(rid, LnError(-32601, f"Unknown command '{method}'"))
        self.calls += 1
        try:
            params = self._params(str(method), request.get("params", {}))
            result = await handler[0](self, params)
        except LnError as exc:
            return self._error(rid, exc)
        except Exception as exc:  # a bug here: lightningd's catch-all, said in the log
            log.exception("call failed", extra={"method": method})
            return self._error(rid, LnError(LIGHTNINGD, f"internal error: {exc!r}"))
        return {"jsonrpc": "2.0", "id": rid, "result": result}

    def _supports(self, method: str) -> bool:
        since = SINCE.get(method)
        until = UNTIL.get(method)
        v = version_tuple(self.version)
        return (since is None or v >= since) and (until is None or v < until)

    @staticmethod
    def _params(method: str, raw: Any) -> dict[str, Any]:
        names, required = METHODS[method][1], METHODS[method][2]
        if isinstance(raw, list):
            if len(raw) > len(names):
                raise LnError(INVALID_PARAMS, "too many parameters")
            params = {n: v for n, v in zip(names, raw, strict=False) if v is not None}
        elif isinstance(raw, dict):
            unknown = set(raw) - set(names)
            if unknown:
                raise LnError(INVALID_PARAMS, f"unknown parameter: {sorted(unknown)[0]}")
            params = {k: v for k, v in raw.items() if v is not None}
        else:
            raise LnError(INVALID_PARAMS, "params must be an object or an array")
        missing = [n for n in required if n not in params]
        if missing:
            raise LnError(INVALID_PARAMS, f"missing required parameter: {missing[0]}")
        return params

    @staticmethod
    def _error(rid: Any, exc: LnError) -> dict[str, Any]:
        error: dict[str, Any] = {"code": exc.code, "message": exc.message}
        if exc.data is not None:
            error["data"] = exc.data
        return {"jsonrpc": "2.0", "id": rid, "error": error}

    # -- long waits -------------------------------------------------------------------

    async def until(self, ready: Callable[[], Any], timeout: float | None) -> Any:
        """``ready()`` once it is not None, or None after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        while True:
            found = ready()
            if found is not None:
                return found
            left = 1.0 if end is None else min(1.0, end - loop.time())
            if left <= 0:
                return None
            await self.changes.wait(left)  # and every second: invoices expire by the clock


# -- the methods ---------------------------------------------------------------------------


async def getinfo(s: NodeServer, _: dict[str, Any]) -> dict[str, Any]:
    net, node = s.network, s.node
    channels = list(net.channels_of(s.name))
    return {
        "id": node.node_id,
        "alias": s.name,
        "color": "00aa77",
        "num_peers": len({c.other(s.name) for c in channels}),
        "num_pending_channels": sum(1 for c in channels if c.state == "CHANNELD_AWAITING_LOCKIN"),
        "num_active_channels": sum(1 for c in channels if c.usable()),
        "num_inactive_channels": 0,
        "address": [],
        "binding": [{"type": "local socket", "socket": str(s.path)}],
        "version": s.version,
        "blockheight": net.height,
        "network": net.chain,
        "fees_collected_msat": node.fees_collected_msat,
        "lightning-dir": str(s.path.parent),
        "our_features": {
            "init": "08a0000a",
            "node": "88a0000a",
            "channel": "",
            "invoice": "02000000",
        },
    }


async def invoice(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    preimage = None
    if "preimage" in p:
        preimage = _hash(p["preimage"], "preimage")
    inv = s.network.invoice(
        s.name,
        msat(p["amount_msat"], "amount_msat", allow_any=True),
        _str(p["label"], "label"),
        _str(p["description"], "description"),
        _uint(p.get("expiry", 604_800), "expiry"),
        preimage,
    )
    secret = s.network.decode(inv.bolt11).payment_secret
    return {
        "bolt11": inv.bolt11,
        "payment_hash": inv.payment_hash.hex(),
        "payment_secret": secret,
        "expires_at": inv.expires_at,
        "created_index": inv.created_index,
    }


def _invoices(s: NodeServer, p: dict[str, Any]) -> list[Invoice]:
    s.network.expire_invoices(s.name)
    found = sorted(s.node.invoices.values(), key=lambda i: i.created_index)
    if "label" in p:
        found = [i for i in found if i.label == _str(p["label"], "label")]
    if "payment_hash" in p:
        h = _hash(p["payment_hash"], "payment_hash")
        found = [i for i in found if i.payment_hash == h]
    if "invstring" in p:
        found = [i for i in found if i.bolt11 == p["invstring"]]
    return found


async def listinvoices(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    return {"invoices": [invoice_json(i) for i in _invoices(s, p)]}


async def waitinvoice(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    label = _str(p["label"], "label")

    def settled() -> Invoice | LnError | None:
        s.network.expire_invoices(s.name)
        inv = s.node.invoices.get(label)
        if inv is None:
            return LnError(LIGHTNINGD, "Invoice deleted during wait")
        if inv.status == "expired":
            return LnError(INVOICE_EXPIRED_DURING_WAIT, "Invoice expired during wait")
        return inv if inv.status == "paid" else None

    found = await s.until(settled, None)
    if isinstance(found, LnError):
        raise found
    return invoice_json(found)


async def waitanyinvoice(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    after = _uint(p.get("lastpay_index", 0), "lastpay_index")
    timeout = _uint(p["timeout"], "timeout") if "timeout" in p else None

    def next_paid() -> Invoice | None:
        paid = [i for i in s.node.invoices.values() if (i.pay_index or 0) > after]
        return min(paid, key=lambda i: i.pay_index or 0) if paid else None

    found = await s.until(next_paid, timeout)
    if found is None:
        raise LnError(INVOICE_WAIT_TIMED_OUT, "Timed out while waiting for invoice to be paid")
    return invoice_json(found)


async def delinvoice(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    status = _str(p["status"], "status")
    if status not in ("paid", "expired", "unpaid"):
        raise LnError(INVALID_PARAMS, "status: should be paid, expired or unpaid")
    return invoice_json(s.network.delinvoice(s.name, _str(p["label"], "label"), status))


async def _pay(s: NodeServer, bolt11: str, p: dict[str, Any], xpay: bool) -> Part:
    amount = msat(p["amount_msat"], "amount_msat") if "amount_msat" in p else None
    maxfee = msat(p["maxfee"], "maxfee") if "maxfee" in p else None
    started = s.network.start_payment(s.name, bolt11, amount, maxfee, xpay)
    if isinstance(started, Part):
        return started  # paid before: ``pay`` answers that success again
    s.network.advance(started)
    attempt: Attempt = started
    await s.until(lambda: True if attempt.resolved else None, None)
    if attempt.error is not None:
        raise attempt.error
    return attempt.part


async def pay(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    part = await _pay(s, _str(p["bolt11"], "bolt11"), p, xpay=False)
    assert part.preimage is not None
    return {
        "payment_preimage": part.preimage.hex(),
        "payment_hash": part.payment_hash.hex(),
        "destination": part.destination,
        "created_at": part.created_at,
        "parts": 1,
        "amount_msat": part.amount_msat,
        "amount_sent_msat": part.amount_sent_msat,
        "status": "complete",
    }


async def xpay(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    part = await _pay(s, _str(p["invstring"], "invstring"), p, xpay=True)
    assert part.preimage is not None
    return {
        "payment_preimage": part.preimage.hex(),
        "failed_parts": 0,
        "successful_parts": 1,
        "amount_msat": part.amount_msat,
        "amount_sent_msat": part.amount_sent_msat,
    }


def _payment_hash_of(s: NodeServer, p: dict[str, Any]) -> bytes | None:
    if "payment_hash" in p:
        return _hash(p["payment_hash"], "payment_hash")
    if "bolt11" in p:
        return bytes.fromhex(s.network.decode(_str(p["bolt11"], "bolt11")).payment_hash or "")
    return None


async def listpays(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    pays = s.network.pays(s.name, _payment_hash_of(s, p))
    if NO_AMOUNT_IN_LISTPAYS[0] <= version_tuple(s.version) < NO_AMOUNT_IN_LISTPAYS[1]:
        for x in pays:
            x.pop("amount_msat", None)
    if "status" in p:
        pays = [x for x in pays if x["status"] == p["status"]]
    return {"pays": pays}


async def listsendpays(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    h = _payment_hash_of(s, p)
    parts = [x for x in s.node.parts if h is None or x.payment_hash == h]
    if "status" in p:
        parts = [x for x in parts if x.status == p["status"]]
    return {"payments": [part_json(x) for x in parts]}


async def waitsendpay(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    h = _hash(p["payment_hash"], "payment_hash")
    timeout = _uint(p["timeout"], "timeout") if "timeout" in p else None
    parts = [x for x in s.node.parts if x.payment_hash == h]
    if not parts:
        raise LnError(PAY_NO_SUCH_PAYMENT, "Never attempted payment")
    last = max(parts, key=lambda x: x.groupid)
    if "groupid" in p:
        last = next((x for x in parts if x.groupid == p["groupid"]), last)
    done = await s.until(lambda: last if last.status != "pending" else None, timeout)
    if done is None:
        raise LnError(PAY_IN_PROGRESS, "Timed out while waiting")
    if done.status == "failed":
        raise LnError(204, "Payment failure", part_json(done))
    return part_json(done)


async def decode(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    inv = s.network.decode(_str(p["string"], "string"))
    doc: dict[str, Any] = {
        "type": "bolt11 invoice",
        "valid": True,
        "currency": inv.currency,
        "created_at": inv.date,
        "expiry": inv.expiry,
        "payee": inv.payee,
        "payment_hash": inv.payment_hash,
        "signature": inv.signature.signature_data.hex() if inv.signature else "",
        "min_final_cltv_expiry": inv.min_final_cltv_expiry,
        "payment_secret": inv.payment_secret,
    }
    if inv.amount_msat is not None:
        doc["amount_msat"] = int(inv.amount_msat)
    if inv.description is not None:
        doc["description"] = inv.description
    return doc


def _channel_json(s: NodeServer, c: Channel) -> dict[str, Any]:
    me, peer = s.name, c.other(s.name)
    doc: dict[str, Any] = {
        "peer_id": s.network.nodes[peer].node_id,
        "peer_connected": not s.network.nodes[peer].faults.offline,
        "state": c.state,
        "short_channel_id": c.scid,
        "channel_id": c.channel_id,
        "funding_txid": c.channel_id,
        "funding_outnum": 0,
        "opener": "local" if c.opener == me else "remote",
        "private": False,
        "to_us_msat": c.balance[me],
        "total_msat": c.capacity_sat * 1000,
        "spendable_msat": c.spendable(me),
        "receivable_msat": c.receivable(me),
        "our_reserve_msat": c.reserve_msat,
        "their_reserve_msat": c.reserve_msat,
        "fee_base_msat": c.fee_base_msat,
        "fee_proportional_millionths": c.fee_ppm,
        "htlcs": [
            {
                "direction": "out" if h.offerer == me else "in",
                "id": i,
                "amount_msat": h.amount_msat,
                "expiry": s.network.height + 40,
                "payment_hash": h.payment_hash.hex(),
            }
            for i, h in enumerate(c.htlcs)
        ],
    }
    if c.splice is not None:
        doc["inflight"] = [
            {
                "funding_txid": c.splice.txid,
                "funding_outnum": 0,
                "feerate": "253perkw",
                "total_funding_msat": (c.capacity_sat + c.splice.capacity_delta_sat) * 1000,
                "splice_amount": c.splice.relative_sat,
                "our_funding_msat": c.balance[me],
            }
        ]
    return doc


async def listpeerchannels(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    channels = list(s.network.channels_of(s.name))
    if "id" in p:
        channels = [c for c in channels if s.network.nodes[c.other(s.name)].node_id == p["id"]]
    for key, attr in (("short_channel_id", "scid"), ("channel_id", "channel_id")):
        if key in p:
            channels = [c for c in channels if getattr(c, attr) == p[key]]
    return {"channels": [_channel_json(s, c) for c in channels]}


async def listfunds(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    spent = bool(p.get("spent", False))
    outputs = [
        {
            "txid": u.txid,
            "output": u.output,
            "amount_msat": u.amount_sat * 1000,
            "scriptpubkey": hashlib.sha256(u.address.encode()).hexdigest(),
            "address": u.address,
            "status": "spent" if u.spent else "confirmed" if u.blockheight else "unconfirmed",
            "reserved": False,
            **({"blockheight": u.blockheight} if u.blockheight else {}),
        }
        for u in s.node.utxos
        if spent or not u.spent
    ]
    channels = [
        {
            "peer_id": s.network.nodes[c.other(s.name)].node_id,
            "connected": not s.network.nodes[c.other(s.name)].faults.offline,
            "state": c.state,
            "channel_id": c.channel_id,
            "short_channel_id": c.scid,
            "our_amount_msat": c.balance[s.name],
            "amount_msat": c.capacity_sat * 1000,
            "funding_txid": c.channel_id,
            "funding_output": 0,
        }
        for c in s.network.channels_of(s.name)
    ]
    return {"outputs": outputs, "channels": channels}


async def connect(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    node_id = _str(p["id"], "id").split("@", 1)[0]
    peer = s.network.by_id(node_id)
    if peer is None or peer.faults.offline:
        raise LnError(400, f"Unable to connect, no address known for peer {node_id}")
    return {
        "id": node_id,
        "features": "08a0000a",
        "direction": "out",
        "address": {"type": "ipv4", "address": "127.0.0.1", "port": 9735},
    }


async def fundchannel(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    peer = s.network.by_id(_str(p["id"], "id"))
    if peer is None:
        raise LnError(LIGHTNINGD, "Unknown peer")
    amount = sat(p["amount"], "amount", allow_all=True)
    if amount is None:
        amount = s.network.wallet_sat(s.name, confirmed_only=True) - 200
    push = msat(p.get("push_msat", 0), "push_msat") or 0
    ch = s.network.fundchannel(s.name, peer.name, amount, push)
    return {
        "tx": "00",
        "txid": ch.channel_id,
        "outnum": 0,
        "channel_id": ch.channel_id,
        "channel_type": {"bits": [12, 22], "names": ["static_remotekey/even", "anchors/even"]},
        "mindepth": 1,
    }


async def newaddr(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    kind = p.get("addresstype", "p2tr")
    if kind not in ("p2tr", "bech32", "all"):
        raise LnError(INVALID_PARAMS, "addresstype: should be p2tr, bech32 or all")
    return {"p2tr": s.network.newaddr(s.name)}


async def withdraw(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    amount = sat(p["satoshi"], "satoshi", allow_all=True)
    txid = s.network.withdraw(s.name, _str(p["destination"], "destination"), amount)
    return {"tx": "00", "txid": txid, "psbt": "cHNidP8B"}


async def feerates(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    style = p["style"]
    if style not in ("perkw", "perkb"):
        raise LnError(INVALID_PARAMS, "style: should be perkw or perkb")
    per = 253 if style == "perkw" else 1012
    return {
        style: {
            "min_acceptable": per,
            "max_acceptable": per * 100,
            "floor": per,
            "opening": per,
            "mutual_close": per,
            "unilateral_close": per,
            "penalty": per,
            "splice": per,
            "estimates": [],
        },
        "onchain_fee_estimates": {"opening_channel_satoshis": 200, "htlc_success_satoshis": 200},
    }


async def splicein(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    amount = sat(p["amount"], "amount")
    assert amount is not None
    txid = s.network.splice(s.name, _str(p["channel"], "channel"), amount)
    return {"psbt": "cHNidP8B", "tx": "00", "txid": txid}


async def spliceout(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    amount = sat(p["amount"], "amount")
    assert amount is not None
    if p.get("destination", "wallet") != "wallet":
        raise LnError(INVALID_PARAMS, "destination: the simulator splices out to the wallet")
    txid = s.network.splice(s.name, _str(p["channel"], "channel"), -amount)
    return {"psbt": "cHNidP8B", "tx": "00", "txid": txid}


# Before v26.04: splice_init, splice_update until the commitments are secured, then
# splice_signed. The simulator's PSBT is a token naming the pending splice.
async def fundpsbt(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    """A PSBT spending the wallet's confirmed outputs for ``satoshi`` and the fee."""
    amount = sat(p["satoshi"], "satoshi")
    assert amount is not None
    if s.network.wallet_sat(s.name, confirmed_only=True) < amount + 200:
        raise LnError(301, f"Could not afford {amount}sat using the wallet's confirmed outputs")
    return {"psbt": f"lnsim-funds:{amount}", "feerate_per_kw": 253, "estimated_final_weight": 0}


async def addpsbtoutput(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    """A PSBT with one output of ``satoshi`` to the wallet."""
    amount = sat(p["satoshi"], "satoshi")
    assert amount is not None
    return {"psbt": f"lnsim-output:{amount}", "estimated_added_weight": 172, "outnum": 0}


async def splice_init(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    relative = p["relative_amount"]
    if not isinstance(relative, int) or isinstance(relative, bool) or relative == 0:
        raise LnError(INVALID_PARAMS, "relative_amount: should be a non-zero integer")
    s.network.channel(s.name, _str(p["channel_id"], "channel_id"))  # it exists
    # like lightningd: funds in come from the initial PSBT's inputs, funds out go to its
    # outputs; without them there is nothing to splice with
    kind, _, amount = str(p.get("initialpsbt", "")).partition(":")
    wanted = ("lnsim-funds" if relative > 0 else "lnsim-output", str(abs(relative)))
    if (kind, amount) != wanted:
        raise LnError(357, "initialpsbt: it does not fund (or receive) the splice")
    return {"psbt": f"lnsim-splice:{p['channel_id']}:{relative}"}


async def splice_update(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    psbt = _str(p["psbt"], "psbt")
    if not psbt.startswith("lnsim-splice:"):
        raise LnError(INVALID_PARAMS, "psbt: not a splice of this node")
    return {"psbt": psbt, "commitments_secured": True, "signatures_secured": True}


async def signpsbt(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    return {"signed_psbt": _str(p["psbt"], "psbt")}


async def splice_signed(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    psbt = _str(p["psbt"], "psbt")
    try:
        _, channel_id, relative = psbt.split(":")
        amount = int(relative)
    except ValueError:
        raise LnError(INVALID_PARAMS, "psbt: not a splice of this node") from None
    txid = s.network.splice(s.name, channel_id, amount)
    return {"tx": "00", "txid": txid, "psbt": psbt, "outnum": 0}


async def bkpr_listincome(s: NodeServer, p: dict[str, Any]) -> dict[str, Any]:
    """The bookkeeper's income events, of two kinds: ``onchain_fee`` (every transaction
    this node paid a miner for) and ``routed`` (fees earned forwarding)."""
    start = int(p.get("start_time") or 0)
    end = int(p["end_time"]) if p.get("end_time") is not None else 2**63
    return {
        "income_events": [
            {
                "account": "wallet" if tag == "onchain_fee" else "channel",
                "tag": tag,
                "credit_msat": credit,
                "debit_msat": debit,
                "currency": "bcrt",
                "timestamp": when,
                **({"txid": ref} if tag == "onchain_fee" else {"payment_id": ref}),
            }
            for tag, credit, debit, ref, when in s.node.income
            if start <= when <= end
        ]
    }


# name -> (handler, parameters in schema order, required ones)
METHODS: dict[str, tuple[Handler, tuple[str, ...], tuple[str, ...]]] = {
    "getinfo": (getinfo, (), ()),
    "invoice": (
        invoice,
        (
            "amount_msat",
            "label",
            "description",
            "expiry",
            "fallbacks",
            "preimage",
            "exposeprivatechannels",
            "cltv",
            "deschashonly",
        ),
        ("amount_msat", "label", "description"),
    ),
    "listinvoices": (
        listinvoices,
        ("label", "invstring", "payment_hash", "offer_id", "index", "start", "limit"),
        (),
    ),
    "waitinvoice": (waitinvoice, ("label",), ("label",)),
    "waitanyinvoice": (waitanyinvoice, ("lastpay_index", "timeout"), ()),
    "delinvoice": (delinvoice, ("label", "status", "desconly"), ("label", "status")),
    "pay": (
        pay,
        (
            "bolt11",
            "amount_msat",
            "label",
            "riskfactor",
            "maxfeepercent",
            "retry_for",
            "maxdelay",
            "exemptfee",
            "localinvreqid",
            "exclude",
            "maxfee",
            "description",
            "partial_msat",
        ),
        ("bolt11",),
    ),
    "xpay": (
        xpay,
        (
            "invstring",
            "amount_msat",
            "maxfee",
            "layers",
            "retry_for",
            "partial_msat",
            "maxdelay",
            "payer_note",
            "label",
            "localinvreqid",
        ),
        ("invstring",),
    ),
    "listpays": (
        listpays,
        ("bolt11", "payment_hash", "status", "index", "start", "limit"),
        (),
    ),
    "listsendpays": (
        listsendpays,
        ("bolt11", "payment_hash", "status", "index", "start", "limit"),
        (),
    ),
    "waitsendpay": (
        waitsendpay,
        ("payment_hash", "timeout", "partid", "groupid"),
        ("payment_hash",),
    ),
    "decode": (decode, ("string",), ("string",)),
    "listpeerchannels": (listpeerchannels, ("id", "short_channel_id", "channel_id"), ()),
    "listfunds": (listfunds, ("spent",), ()),
    "bkpr-listincome": (
        bkpr_listincome,
        ("consolidate_fees", "start_time", "end_time"),
        (),
    ),
    "connect": (connect, ("id", "host", "port"), ("id",)),
    "fundchannel": (
        fundchannel,
        (
            "id",
            "amount",
            "feerate",
            "announce",
            "minconf",
            "push_msat",
            "close_to",
            "request_amt",
            "compact_lease",
            "utxos",
            "mindepth",
            "reserve",
            "channel_type",
        ),
        ("id", "amount"),
    ),
    "newaddr": (newaddr, ("addresstype",), ()),
    "withdraw": (
        withdraw,
        ("destination", "satoshi", "feerate", "minconf", "utxos"),
        ("destination", "satoshi"),
    ),
    "feerates": (feerates, ("style",), ("style",)),
    "splicein": (splicein, ("channel", "amount"), ("channel", "amount")),
    "spliceout": (
        spliceout,
        ("channel", "amount", "destination", "force_feerate"),
        ("channel", "amount"),
    ),
    "fundpsbt": (
        fundpsbt,
        (
            "satoshi",
            "feerate",
            "startweight",
            "minconf",
            "reserve",
            "locktime",
            "min_witness_weight",
            "excess_as_change",
            "nonwrapped",
            "opening_anchor_channel",
        ),
        ("satoshi", "feerate", "startweight"),
    ),
    "addpsbtoutput": (
        addpsbtoutput,
        ("satoshi", "initialpsbt", "locktime", "destination"),
        ("satoshi",),
    ),
    "splice_init": (
        splice_init,
        ("channel_id", "relative_amount", "initialpsbt", "feerate_per_kw", "force_feerate"),
        ("channel_id", "relative_amount"),
    ),
    "splice_update": (splice_update, ("channel_id", "psbt"), ("channel_id", "psbt")),
    "signpsbt": (signpsbt, ("psbt", "signonly"), ("psbt",)),
    "splice_signed": (
        splice_signed,
        ("channel_id", "psbt", "sign_first"),
        ("psbt",),
    ),
}
SINCE = {"xpay": (24, 11), "splicein": (26, 4), "spliceout": (26, 4)}
UNTIL: dict[str, tuple[int, int]] = {}
# lightning#7881, fixed by #7941 in v24.11.1 (the simulator's versions name no point release)
NO_AMOUNT_IN_LISTPAYS = ((24, 11), (24, 12))
