"""The local guild's main job (``constellation demo``): payments at every operator and
between them, failures, and the checks after each step."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TextIO

from services.crossload import run_cross
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
        f"Lightning: a simulated network of {len(nodes)} nodes, one per operator, with a "
        f"channel of {guild.CHANNEL_SAT:,} sat between every pair; each gateway watches "
        "its node through lightningd's JSON-RPC"
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
