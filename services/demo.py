"""The local guild's main job (``constellation demo``): payments at every operator and
between them, failures, and the checks after each step."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TextIO

import aiohttp
from pyln.client import LightningRpc

from services.crossload import run_cross, settled_books_agree
from services.devnet import Devnet, guild
from services.workload import run_workload


async def run_guild_demo(
    directory: Path, operators: int, workers: int, payments: int, clients: int, out: TextIO
) -> bool:
    """The guild's main job: payments at every operator and between them, settled over
    Lightning; a shard's leader killed with ``kill -9`` and its twin taking over; a
    whole operator stopped and the others
    electing leaders of its shards while payments go on elsewhere; the operator back and
    caught up. Prints what happened; True if every check held."""

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    def run(net: Devnet, count: int) -> Awaitable[bool]:
        return run_workload(net, 10, 10, count, clients, out)

    nets = await asyncio.to_thread(guild.up, directory, operators, workers, "demo")
    say(
        f"guild 'demo' up in {directory}: {operators} operators x {workers} workers; every "
        f"shard has {2 * operators} copies, one on each machine of every operator"
    )
    nodes = await asyncio.to_thread(guild.lightning, directory, "/v1/nodes")
    say(
        f"Lightning: a simulated network of {len(nodes)} nodes, one per operator and one for"
        f" the outside world, with a channel of {guild.CHANNEL_SAT:,} sat between every pair;"
        " each gateway and mint uses its node through lightningd's JSON-RPC"
    )
    ok = True
    for net in nets:
        say(f"\n== payments at {net.operator} ({net.gateway_url})")
        ok &= await run(net, payments)
    say(
        "\n== payments between operators: spent at the payer's ledger at once, pending at the"
        " payee's, settled over Lightning every second (one payment per pair and batch)"
    )
    ok &= await run_cross(nets, 6, 4, payments // 2, clients, out)
    ok &= await _money_in_and_out(directory, nets, say, out)

    await _kill_a_leader(nets, say)
    ok &= await run(nets[0], payments // 2)

    gone = nets[0]
    say(f"\n== stop every process of {gone.operator}")
    before = {s: (guild.leader(nets, s) or {"confirmed": 0})["confirmed"] for s in _shards(gone)}
    started = time.monotonic()
    await asyncio.to_thread(guild.stop_operator, directory, gone.operator)
    nodes = await asyncio.to_thread(guild.lightning, directory, "/v1/nodes")
    offline = [n["name"] for n in nodes if not n["online"]]
    say(f"its Lightning node went down with it (offline: {', '.join(offline)})")
    for s in _shards(gone):
        new = await asyncio.to_thread(guild.wait_new_leader, nets, s, before[s])
        say(
            f"{s}: copy {new['copy']} at {new['operator']} elected in term {new['term']}, "
            f"a block confirmed {(time.monotonic() - started) * 1000:.0f} ms after the stop"
        )
    say(f"{gone.operator}'s users pay through {nets[1].operator}'s gateway meanwhile:")
    ok &= await run_workload(gone, 10, 10, payments // 2, clients, out, via=nets[1])

    say(f"\n== start {gone.operator} again")
    started = time.monotonic()
    await asyncio.to_thread(guild.start_operator, directory, gone.operator)
    by_shard = await asyncio.to_thread(guild.wait_converged, nets)
    say(f"every copy caught up in {time.monotonic() - started:.1f} s:")
    for s, cs in sorted(by_shard.items()):
        lead = max((c for c in cs if c["role"] == "leader"), key=lambda c: c["term"])
        say(
            f"  {s}: {len(cs)} copies at height {cs[0]['confirmed']}, state root "
            f"{cs[0]['root'][:16]}..., led by copy {lead['copy']} in term {lead['term']}"
        )
    await asyncio.to_thread(guild.wait_home, nets)
    say(f"leadership of every shard is back with its owner; payments at {gone.operator}:")
    ok &= await run(gone, payments // 2)
    say(f"\n== payments between operators again, {gone.operator} settling with the others")
    ok &= await run_cross(nets, 6, 4, payments // 2, clients, out)
    books = await asyncio.to_thread(guild.lightning, directory, "/v1/books")
    missing = int(books["missing_msat"])
    say(
        f"Lightning books: {books['minted_msat']:,} msat minted, all accounted for"
        if missing == 0
        else f"Lightning books: {missing:,} msat MISSING"
    )
    ok &= missing == 0
    say("\nguild demo: " + ("every check held" if ok else "A CHECK FAILED"))
    return ok


async def _wallet(say: Callable[[str], None] | None, *argv: str) -> str:
    """``constellation wallet ARGV`` as a user runs it (its own process), shown where
    ``say`` is given; what it printed. It must succeed."""
    if say is not None:
        shown = " ".join(a if len(a) < 60 else a[:24] + "…" for a in argv)
        say(f"$ constellation wallet {shown}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "wallet",
        *argv,
        stdin=asyncio.subprocess.DEVNULL,  # nothing to answer: the demo's fees are shown
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    printed, _ = await proc.communicate()
    text = printed.decode()
    if say is not None:
        for line in text.splitlines():
            say(f"  {line}")
    if proc.returncode != 0:
        raise DemoError(f"`wallet {argv[0]}` exited {proc.returncode}: {text[-300:]}")
    return text


async def _balance(say: Callable[[str], None], file: str, msat: int) -> None:
    """Wait until the wallet's balance is ``msat`` (its gateway's index follows the
    ledger's blocks a moment behind, and a payment from another operator is pending
    there until the operators settle), then show it."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _coins_msat(await _wallet(None, "balance", "--file", file)) == msat:
            await _wallet(say, "balance", "--file", file)
            return
        await asyncio.sleep(0.5)
    raise DemoError(f"{file}: the balance never reached {msat} msat")


class DemoError(RuntimeError):
    """A step of the demo that did not do what it should."""


def _coins_msat(balance: str) -> int | None:
    """What ``wallet balance`` said the coins are worth."""
    for line in balance.splitlines():
        if " msat in " in line and line.endswith("coins"):
            return int(line.split(" msat in ", 1)[0])
    return None


async def _money_in_and_out(
    directory: Path, nets: list[Devnet], say: Callable[[str], None], out: TextIO
) -> bool:
    """Carol (at the first operator) deposits over Lightning: her mint's invoice paid
    from her own Lightning wallet (the network's outside node); the ecash is redeemed
    into an L3 coin. She pays Dave at the second operator, pays a merchant's invoice
    through her mint (a withdrawal and a melt), and every operator's books hold."""
    here, there = nets[0], nets[1]
    say(
        f"\n== money in and out: a deposit over Lightning at {here.operator}'s mint, ecash"
        f" into an L3 coin, a payment to {there.operator}, an invoice paid through the mint"
    )
    carol, dave = str(directory / "carol.json"), str(directory / "dave.json")
    try:
        for file, net in ((carol, here), (dave, there)):
            urls = ("--gateway", net.gateway_url, "--mint", net.mint_url)
            await _wallet(None, "create", "--file", file, *urls)
        deposit = asyncio.ensure_future(
            _wallet(say, "deposit", "50000", "--no-qr", "--wait", "60", "--file", carol)
        )
        invoice = await _pending_invoice(Path(carol))
        say("  (paid from Carol's own Lightning wallet: the simulated network's outside node)")
        node = LightningRpc(guild.outside_rpc(directory))
        await asyncio.to_thread(node.pay, invoice)
        await deposit
        await _balance(say, carol, 50_000_000)
        to_dave = (await _wallet(None, "address", "--file", dave)).strip()
        await _wallet(say, "pay", to_dave, "20000000", "--file", carol)
        await _balance(say, dave, 20_000_000)
        bill = node.invoice(12_345_000, f"demo-{os.urandom(4).hex()}", "a merchant's bill")
        await _wallet(say, "pay", bill["bolt11"], "--yes", "--file", carol)
        [paid] = node.listinvoices(payment_hash=bill["payment_hash"])["invoices"]
        say(f"  the merchant's node says of that invoice: {paid['status']}")
        if paid["status"] != "paid":
            raise DemoError("the invoice was not paid")
    except DemoError as exc:
        say(f"MONEY PATH FAILED: {exc}")
        return False
    say("the books, at every operator (L3 coins + ecash out there = Lightning + on-chain):")
    async with aiohttp.ClientSession() as session:
        return await settled_books_agree(nets, session, out)


async def _pending_invoice(wallet: Path) -> str:
    """The invoice of the deposit a wallet command recorded in ``wallet``'s file."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            flows = json.loads(wallet.read_text())["flows"]
            if flows:
                return str(flows[0]["request"])
        await asyncio.sleep(0.1)
    raise DemoError("no deposit was recorded")


def _shards(net: Devnet) -> list[str]:
    return [f"{net.operator}/{w}" for w in range(net.shards)]


async def _kill_a_leader(nets: list[Devnet], say: Callable[[str], None]) -> None:
    shard = f"{nets[0].operator}/0"
    lead = guild.leader(nets, shard)
    assert lead is not None
    say(
        f"\n== kill -9 the leader of {shard}: copy {lead['copy']}, {lead['operator']} "
        f"machine {lead['machine']} (pid {lead['pid']})"
    )
    started = time.monotonic()
    os.kill(lead["pid"], signal.SIGKILL)
    new = await asyncio.to_thread(guild.wait_new_leader, nets, shard, lead["confirmed"])
    say(
        f"copy {new['copy']} ({new['operator']} machine {new['machine']}) leads in term "
        f"{new['term']} and confirmed a block {(time.monotonic() - started) * 1000:.0f} ms "
        "after the kill; the supervisor restarts the killed machine"
    )
