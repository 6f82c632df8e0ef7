"""The ``constellation`` command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from coincurve import PublicKeyXOnly

from constellation import __version__
from constellation.demo import run_demo
from constellation.guild import Statement
from constellation.protocol import signer as proto
from constellation.protocol.envelope import Membership
from services import devnet
from services.runtime import ConfigError
from services.signer.client import call
from services.signer.config import load_members
from services.signer.store import KeyStore

DEFAULT_DIR = Path(".devnet")


def _operator(net: devnet.Devnet, index: int) -> tuple[Membership, bytes]:
    if not 0 <= index < len(net.signers):
        raise ConfigError(f"the devnet has operators 0..{len(net.signers) - 1}")
    proc = net.signers[index]
    hostseckey = KeyStore(Path(proc.state_dir), bytes.fromhex(proc.storage_key)).load_identity()
    return load_members(net.members_path), hostseckey


def _guild(args: argparse.Namespace) -> int:
    net = devnet.Devnet.load(args.dir)
    members, hostseckey = _operator(net, args.operator)
    n = len(members.hostpubkeys)
    request: proto.KeygenRequest | proto.SignRequest
    if args.guild_command == "keygen":
        t = args.threshold or n // 2 + 1
        request = proto.KeygenRequest(t)
    else:
        request = proto.SignRequest(Statement(args.message))
    reply = asyncio.run(call(net.nats_url, members, hostseckey, request, args.timeout))
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


def _devnet(args: argparse.Namespace) -> int:
    if args.devnet_command == "up":
        net = devnet.up(args.dir, args.signers, args.guild)
        print(f"devnet {net.guild!r} up in {net.dir}: nats {net.nats_url}")
        for proc in net.signers:
            print(f"  signer {proc.index}: pid {proc.pid}, http://127.0.0.1:{proc.http_port}")
    else:
        devnet.down(args.dir, args.purge)
        print("devnet down" + (" and deleted" if args.purge else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="constellation", description=__doc__)
    parser.add_argument("--version", action="version", version=f"constellation {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="wallets, genesis funding and payments on an in-process ledger"
    )
    demo.add_argument("--workers", type=int, default=4, help="simulated partition workers")
    demo.add_argument("--payments", type=int, default=200, help="random payments to make")
    demo.add_argument("--seed", type=int, default=None, help="seed for a reproducible run")

    net = sub.add_parser("devnet", help="a local guild: nats-server and signers")
    net_sub = net.add_subparsers(dest="devnet_command", required=True)
    up = net_sub.add_parser("up", help="start (creating it the first time)")
    up.add_argument("--signers", type=int, default=3, help="guild members (first time)")
    up.add_argument("--guild", default="devnet", help="guild id (first time)")
    down = net_sub.add_parser("down", help="stop every process")
    down.add_argument("--purge", action="store_true", help="and delete the devnet's state")
    for p in (up, down):
        p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="devnet state folder")

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

    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return run_demo(args.workers, args.payments, args.seed, sys.stdout)
        if args.command == "devnet":
            return _devnet(args)
        return _guild(args)
    except (ConfigError, devnet.DevnetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
