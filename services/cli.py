"""The ``constellation`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from coincurve import PublicKeyXOnly

from constellation import __version__
from constellation.address import Network, decode_address
from constellation.errors import ConstellationError
from constellation.guild import Statement
from constellation.protocol import signer as proto
from constellation.replication.placement import BATCH, MAX_MACHINES
from constellation.tx import TxOutput
from services import devnet
from services.api_client import Gateway, GatewayError
from services.demo import run_guild_demo
from services.devnet import guild
from services.ecash.client import MintError
from services.replica.config import MACHINES
from services.runtime import ConfigError
from services.signer.client import call
from services.wallet import wallet_command, wallet_lock
from services.wallet_money import MoneyError, money_command
from services.workload import run_workload

DEFAULT_DIR = Path(".devnet")
# the wallet commands that use (or follow) its mint
MONEY = ("deposit", "pay", "balance", "restore", "rescan")


def _guild(args: argparse.Namespace) -> int:
    net = devnet.Devnet.load(args.dir)
    if not 0 <= args.operator < len(net.signers):
        raise ConfigError(f"the devnet has operators 0..{len(net.signers) - 1}")
    access = net.signer_access(args.operator)
    n = len(access.members.hostpubkeys)
    request: proto.KeygenRequest | proto.SignRequest
    if args.guild_command == "keygen":
        t = args.threshold or n // 2 + 1
        request = proto.KeygenRequest(t)
    else:
        request = proto.SignRequest(Statement(args.message))
    reply = asyncio.run(call(access, request, args.timeout))
    if not reply.ok:
        print(f"error [{reply.code}]: {reply.error}", file=sys.stderr)
        return 1
    if args.guild_command == "keygen":
        print(f"guild key (x-only): {reply.threshold_pubkey[1:].hex()}")
        print(f"threshold: {request.t} of {n}")  # type: ignore[union-attr]
        return 0
    valid = PublicKeyXOnly(reply.threshold_pubkey).verify(reply.signature, reply.message)
    print(f"message (hex):      {reply.message.hex()}")
    print(f"guild key (x-only): {reply.threshold_pubkey.hex()}")
    print(f"signature:          {reply.signature.hex()}")
    print(f"ROAST sessions: {reply.sessions}; signers blamed: {reply.blamed or 'none'}")
    print("BIP340 verification (coincurve):", "valid" if valid else "INVALID")
    return 0 if valid else 1


def _print_devnet(net: devnet.Devnet) -> None:
    print(f"devnet {net.guild!r} up in {net.dir}")
    print(f"  gateway:    {net.gateway_url} (pid {net.gateway_pid}; API at /openapi.json)")
    print(f"  explorer:   {net.gateway_url}/explorer/")
    print(f"  console:    {net.gateway_url}/console/ (token {net.console_token})")
    for w in net.workers:
        print(f"  worker {w.index}:   pid {w.pid}, http://127.0.0.1:{w.http_port}")
    for proc in net.signers:
        print(f"  signer {proc.index}:   pid {proc.pid}, http://127.0.0.1:{proc.http_port}")
    print(f"  indexer:    pid {net.indexer_pid}, http://127.0.0.1:{net.indexer_port}")
    users = " (users and passwords in nats.conf)" if net.nats_password else ""
    print(f"  nats:       nats://127.0.0.1:{net.nats_port}{users}")
    print(f"  redis:      {net.redis_url}")
    print(f"  postgresql: {net.database_url}")
    if net.lightning_rpc:
        print(f"  lightning:  {net.lightning_rpc} (a simulated node: `lightning-cli --rpc-file`)")
    if net.has_mint:
        print(f"  mint:       {net.mint_url} (pid {net.mint_pid}; Cashu: `cashu --host URL`)")
    supervisor = devnet.read_status(Path(net.dir))
    if supervisor is not None:
        print(f"  supervisor: pid {supervisor['pid']}, restarts what exits (`devnet status`)")


def _ago(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    return f"{s // 3600}h {s % 3600 // 60}m"


def _print_status(st: devnet.DevnetStatus) -> None:
    p = st.policy
    if st.supervisor == "none":
        print(f"devnet {st.guild!r} in {st.dir}: not supervised")
    else:
        print(
            f"devnet {st.guild!r} in {st.dir}: supervisor pid {st.supervisor_pid} "
            f"{st.supervisor}; restarts after {p.initial_s:g} s doubling to {p.max_s:g} s "
            f"(reset after {p.reset_after_s:g} s up)"
        )
    now = time.time()
    rows = [("process", "pid", "state", "restarts", "last exit", "up since")]
    for proc in st.processes:
        if proc.up_since is not None:
            clock = datetime.fromtimestamp(proc.up_since).strftime("%H:%M:%S")
            since = f"{clock} ({_ago(now - proc.up_since)})"
        elif proc.restart_in_s is not None:
            since = f"restart in {proc.restart_in_s:.1f} s"
        else:
            since = "-"
        pid = str(proc.pid) if proc.pid else "-"
        row = (proc.name, pid, proc.state, str(proc.restarts), proc.last_exit or "-", since)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


async def _fund(net: devnet.Devnet, address: str, amount_msat: int) -> dict[str, Any]:
    owner = decode_address(address, Network.from_name(net.network))
    issuance = net.issuance([TxOutput(amount_msat, owner)])
    async with aiohttp.ClientSession() as session:
        receipt = await Gateway(net.gateway_url, session).issue(issuance)
    await asyncio.to_thread(guild.deposit, net, amount_msat)
    return receipt


def _devnet(args: argparse.Namespace) -> int:
    in_guild = (args.dir / guild.GUILD_FILE).exists()
    if args.devnet_command == "up" and args.operators > 1:
        nets = guild.up(
            args.dir, args.operators, args.workers, args.guild, args.neighbours, args.machines
        )
        others = guild.load_neighbours(args.dir)
        print(f"guild {args.guild!r} up in {args.dir}: {len(nets)} operators")
        if others:
            print(f"its neighbour, guild {others[0].guild!r}: {len(others)} operators")
        for net in nets + others:
            _print_devnet(net)
    elif args.devnet_command == "up":
        net = devnet.up(args.dir, args.signers, args.guild, args.workers, not args.unsupervised)
        _print_devnet(net)
    elif args.devnet_command == "status" and in_guild:
        folders = guild.operator_dirs(args.dir) + guild.neighbour_dirs(args.dir)
        states = [devnet.status(d) for d in folders]
        if args.json:
            print(json.dumps([st.to_json() for st in states], indent=2))
        else:
            for st in states:
                _print_status(st)
        return 0 if all(st.healthy for st in states) else 1
    elif args.devnet_command == "status":
        st = devnet.status(args.dir)
        if args.json:
            print(json.dumps(st.to_json(), indent=2))
        else:
            _print_status(st)
        return 0 if st.healthy else 1
    elif args.devnet_command == "fund":
        net = devnet.Devnet.load(args.dir)
        receipt = asyncio.run(_fund(net, args.address, args.amount_msat))
        coin = receipt["outputs"][0]["coin_id"]
        print(f"issued {args.amount_msat} msat to {args.address}: coin {coin}")
    elif args.devnet_command == "stop":
        guild.stop_operator(args.dir, args.operator)
        print(f"operator {args.operator} stopped")
    elif args.devnet_command == "start":
        guild.start_operator(args.dir, args.operator)
        print(f"operator {args.operator} started and caught up")
    elif args.devnet_command == "machines":
        done = guild.set_machines(args.dir, args.operator, args.machines, args.batch)
        print(
            f"operator {done.operator}: {done.before} -> {done.after} machines, "
            f"{done.moved} copy slots moved in {done.seconds} s (placement v{done.placement})"
        )
    elif args.devnet_command in ("leave", "join"):
        print(_membership(args))
    elif in_guild:
        guild.down(args.dir)
        if args.purge:
            shutil.rmtree(args.dir)
        print("guild down" + (" and deleted" if args.purge else ""))
    else:
        devnet.down(args.dir, args.purge)
        print("devnet down" + (" and deleted" if args.purge else ""))
    return 0


def _membership(args: argparse.Namespace) -> str:
    """``devnet leave`` or ``devnet join``: what it did."""
    if args.devnet_command == "leave":
        left = guild.leave(args.dir, args.operator)
        return (
            f"operator {left.operator} left: every shard's voters are "
            f"{', '.join(left.voters)} ({left.seconds:.1f} s); its processes stopped; "
            f"new guild key {left.key} ({left.key_seconds:.1f} s), the guild's coins "
            f"moved to it ({', '.join(left.moved) or 'none held'})"
        )
    joined = guild.join(args.dir, args.operator)
    return (
        f"operator {joined.operator} joined: the members restarted on the layout naming it"
        f" ({joined.roll_seconds:.1f} s); every shard's voters are "
        f"{', '.join(joined.voters)} ({joined.seconds:.1f} s); new guild key {joined.key}"
        f" ({joined.key_seconds:.1f} s), the guild's coins moved to it "
        f"({', '.join(joined.moved) or 'none held'})"
    )


def _demo(args: argparse.Namespace) -> int:
    """The main job: a fresh local guild (or one operator), payments, a report. What
    fails leaves its state and logs behind, stopped, for a look."""
    _purge(args.dir)
    ok = False
    try:
        if args.operators > 1:
            ok = asyncio.run(
                run_guild_demo(
                    args.dir,
                    args.operators,
                    args.workers,
                    args.payments or 600,
                    args.clients,
                    sys.stdout,
                )
            )
        else:
            net = devnet.up(args.dir, 0, "demo", args.workers)
            _print_devnet(net)
            ok = asyncio.run(
                run_workload(
                    net, args.wallets, args.coins, args.payments or 3000, args.clients, sys.stdout
                )
            )
    finally:
        if ok and not args.keep:
            _purge(args.dir)
        elif not ok and not args.keep:
            _purge(args.dir, keep=True)
            print(f"stopped; its state and logs are in {args.dir}", file=sys.stderr)
    return 0 if ok else 1


def _purge(directory: Path, keep: bool = False) -> None:
    """Stop the devnet or local guild in ``directory``, if there is one, and delete its
    state (unless ``keep``)."""
    if (directory / guild.GUILD_FILE).exists():
        guild.down(directory)
        if not keep:
            shutil.rmtree(directory)
    elif (directory / devnet.STATE_FILE).exists():
        devnet.down(directory, purge=not keep)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="constellation", description=__doc__)
    parser.add_argument("--version", action="version", version=f"constellation {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="a fresh local guild (or one operator): payments, failures, recovery, checks",
    )
    demo.add_argument("--workers", type=int, default=2, help="partition workers")
    demo.add_argument("--wallets", type=int, default=20, help="wallets to fund")
    demo.add_argument("--coins", type=int, default=20, help="coins each wallet is funded with")
    demo.add_argument(
        "--operators",
        type=int,
        default=3,
        help="operators of a local guild (1: one operator, no replication)",
    )
    demo.add_argument(
        "--payments", type=int, help="payments to make (3000; a guild: 600 at each operator)"
    )
    demo.add_argument("--clients", type=int, default=64, help="concurrent paying clients")
    demo.add_argument("--dir", type=Path, default=Path(".devnet-demo"), help="its state folder")
    demo.add_argument("--keep", action="store_true", help="leave the devnet running")
    _add_devnet(sub)
    _add_wallet(sub)
    _add_guild(sub)
    return parser


def _add_devnet(sub: Any) -> None:
    net = sub.add_parser(
        "devnet", help="a local operator: NATS, Redis, PostgreSQL, workers, gateway, signers"
    )
    net_sub = net.add_subparsers(dest="devnet_command", required=True)
    up = net_sub.add_parser("up", help="start (creating it the first time)")
    up.add_argument("--signers", type=int, default=3, help="guild members (first time)")
    up.add_argument("--workers", type=int, default=2, help="partition workers (first time)")
    up.add_argument("--guild", default="devnet", help="guild id (first time)")
    up.add_argument(
        "--operators",
        type=int,
        default=1,
        help="2 or more: a local guild of that many operators, each shard replicated at all",
    )
    up.add_argument(
        "--neighbours",
        type=int,
        default=0,
        help="a local guild: 2 or more runs a second guild of that many operators beside it,"
        " every operator of each settling with every operator of the other",
    )
    up.add_argument(
        "--machines",
        type=int,
        default=MACHINES,
        help="a local guild: each operator's machines (first time), over which its two"
        " copies of every shard spread",
    )
    up.add_argument(
        "--unsupervised", action="store_true", help="no supervisor: nothing restarts a process"
    )
    status = net_sub.add_parser(
        "status", help="each process: pid, state, restarts, last exit (exit 1 if one is down)"
    )
    status.add_argument("--json", action="store_true", help="as JSON")
    fund = net_sub.add_parser("fund", help="issue new coins to an address (devnet issuer key)")
    fund.add_argument("address")
    fund.add_argument("amount_msat", type=int)
    down = net_sub.add_parser("down", help="stop every process")
    down.add_argument("--purge", action="store_true", help="and delete the devnet's state")
    stop = net_sub.add_parser("stop", help="a local guild: stop one operator's every process")
    start = net_sub.add_parser("start", help="a local guild: start a stopped operator again")
    machines = net_sub.add_parser(
        "machines",
        help="a local guild: run an operator on more or fewer machines, moving its copies"
        " live (new machines start first; removed ones stop once nothing is on them)",
    )
    leave = net_sub.add_parser(
        "leave",
        help="a local guild: a member leaves (the others agree; every shard's members change"
        " through a joint step while payments go on; then its processes stop)",
    )
    join = net_sub.add_parser(
        "join",
        help="a local guild: a new member joins (the members restart on the layout naming it;"
        " its copies learn every shard's log, then vote; then a new guild key is made)",
    )
    for p in (stop, start, machines, leave, join):
        p.add_argument("operator", help="its name (op0, op1, ..., a neighbour's nb0, ...)")
    machines.add_argument("machines", type=int, help=f"{MACHINES} to {MAX_MACHINES}")
    machines.add_argument(
        "--batch", type=int, default=BATCH, help="copy slots moving at once (default %(default)s)"
    )
    for p in (up, status, fund, down, stop, start, machines, leave, join):
        p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="devnet state folder")


def _add_wallet(sub: Any) -> None:
    wallet = sub.add_parser("wallet", help="a wallet against a gateway and its mint")
    wallet_sub = wallet.add_subparsers(dest="wallet_command", required=True)
    create = wallet_sub.add_parser("create", help="new BIP39 words")
    restore = wallet_sub.add_parser(
        "restore", help="from BIP39 words: the keys in use, and the ecash at --mint, found again"
    )
    restore.add_argument("words", nargs="+")
    for p in (create, restore):
        p.add_argument("--network", default="regtest", help="main, test or regtest")
        p.add_argument("--mint", default="", help="its operator's Cashu mint (deposits, invoices)")
    rescan = wallet_sub.add_parser(
        "rescan",
        help="find the keys in use at the gateway, and the wallet's ecash at its mint (as a"
        " restore from words does)",
    )
    address = wallet_sub.add_parser("address", help="a fresh receive address")
    balance = wallet_sub.add_parser(
        "balance", help="unspent coins (and deposits and payments in flight, taken up)"
    )
    pin = wallet_sub.add_parser(
        "pin",
        help="trust a guild: its descriptor (default: the one the wallet's gateway serves) and"
        " the gateways to ask; then every checkpoint and proof is checked against it",
    )
    pin.add_argument("descriptor", nargs="?", default="", help="cstguild1...")
    pin.add_argument(
        "--server", action="append", default=[], help="another member's gateway (repeat)"
    )
    verify = wallet_sub.add_parser(
        "verify", help="a transaction's proof from the guild's gateways, and the verdict"
    )
    verify.add_argument("txid")
    follow = wallet_sub.add_parser(
        "follow",
        help="follow the wallet's addresses (or those named) over a gateway's websocket, each"
        " change checked against the pinned guild before it is printed",
    )
    follow.add_argument("--address", action="append", default=[], help="an address (repeat)")
    follow.add_argument("--count", type=int, default=0, help="stop after this many (0: never)")
    follow.add_argument(
        "--since", type=int, default=-1, help="from this checkpoint (default: the latest)"
    )
    history = wallet_sub.add_parser("history", help="coins received and spent")
    history.add_argument("--limit", type=int, default=20)
    deposit = wallet_sub.add_parser(
        "deposit",
        help="an invoice (and its QR code) to pay from any Lightning wallet; credited as a"
        " coin once paid (exit 3: not paid yet, `wallet balance` takes it up)",
    )
    deposit.add_argument("amount_sat", type=int)
    deposit.add_argument("--wait", type=float, default=600.0, help="seconds to wait for it")
    deposit.add_argument("--no-qr", action="store_true", help="the invoice as text only")
    deposit.add_argument(
        "--onchain", action="store_true", help="an address of the guild's, not an invoice"
    )
    pay = wallet_sub.add_parser(
        "pay",
        help="pay an L3 address, a BOLT11 invoice or a bitcoin: URI with lightning=; the fees"
        " shown first (exit 1: failed, 3: pending, `wallet balance` follows it)",
    )
    pay.add_argument("thing", help="what was scanned or pasted")
    pay.add_argument("amount_msat", type=int, nargs="?", help="for an address: how much")
    pay.add_argument("--fee-msat", type=int, default=1_000, help="the L3 transaction's fee")
    pay.add_argument("--max-fee-msat", type=int, help="refuse where the fees may be more")
    pay.add_argument("--yes", action="store_true", help="do not ask at a terminal")
    pay.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for the payment (then PENDING)"
    )
    for p in (deposit, pay, balance, rescan):
        p.add_argument("--mint", default="", help="the mint (default: the wallet's)")
    for p in (
        create,
        restore,
        rescan,
        address,
        balance,
        history,
        deposit,
        pay,
        pin,
        verify,
        follow,
    ):
        p.add_argument("--file", type=Path, default=Path("wallet.json"), help="the wallet file")
        p.add_argument("--gateway", default="", help="gateway URL (default: the wallet's)")
    for p in (balance, pay):
        p.add_argument(
            "--via",
            default="",
            help="another guild member's gateway, while the wallet's own operator is down",
        )


def _add_guild(sub: Any) -> None:
    guild = sub.add_parser("guild", help="the guild's threshold key on a devnet")
    guild_sub = guild.add_subparsers(dest="guild_command", required=True)
    keygen = guild_sub.add_parser("keygen", help="ChillDKG among all the devnet's signers")
    keygen.add_argument("--threshold", type=int, default=0, help="t (default: majority)")
    sign = guild_sub.add_parser("sign", help="ROAST-sign a statement with the guild key")
    sign.add_argument("message", help="the statement (UTF-8, signed as is)")
    for p in (keygen, sign):
        p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="devnet state folder")
        p.add_argument("--operator", type=int, default=0, help="which member coordinates")
        p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "devnet":
            return _devnet(args)
        if args.command == "wallet":
            with wallet_lock(args.file):
                command = money_command if args.wallet_command in MONEY else wallet_command
                return asyncio.run(command(args, sys.stdout))
        return _guild(args)
    except (ConfigError, devnet.DevnetError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ConstellationError, GatewayError, MintError, MoneyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
