"""Packages: items per destination, closed at the end of the loop turn; lazy items ride
with the next package to their destination or go ``LAZY_S`` later."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from nats.aio.client import Client

from constellation.protocol import ledger as proto
from services.bus import LAZY_S, Batching, Packer


class Recorder:
    """Stands in for the NATS client: keeps what is published."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any]]] = []

    async def publish(self, subject: str, data: bytes) -> None:
        self.sent.append((subject, proto.decode_package(data).items))


def packer(nc: Recorder) -> Packer:
    """A packer whose publishing task runs (until the test's loop ends)."""
    p = Packer(cast(Client, nc), 0, "w.0", lambda: 1, Batching(512, 0), lambda _: None)
    RUNNING.add(asyncio.get_running_loop().create_task(p.run()))
    return p


RUNNING: set[asyncio.Task[None]] = set()


async def turn() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_lazy_items_ride_with_the_next_package_or_go_later() -> None:
    nc = Recorder()
    p = packer(nc)
    done, ask = proto.Done(b"t" * 32, 1), proto.Ask(b"u" * 32, 2)
    p.send("w.1", done, lazy=True)
    await turn()
    assert nc.sent == []  # nothing else went to w.1: it waits
    p.send("w.1", ask)
    await turn()
    assert nc.sent == [("w.1", [done, ask])]  # one package, in order

    p.send("w.2", ask)
    p.send("w.2", done, lazy=True)
    await turn()
    assert nc.sent[1:] == [("w.2", [ask, done])]

    p.send("w.3", done, lazy=True)
    await asyncio.sleep(LAZY_S * 1.5)
    assert nc.sent[2:] == [("w.3", [done])]  # alone, after LAZY_S
    await asyncio.sleep(LAZY_S)
    assert len(nc.sent) == 3  # and only once
    await p.drain()


async def test_drain_sends_lazy_items_at_once() -> None:
    nc = Recorder()
    p = packer(nc)
    done = proto.Done(b"t" * 32, 1)
    p.send("w.1", done, lazy=True)
    await p.drain()
    assert nc.sent == [("w.1", [done])]


async def test_a_package_closes_at_its_bytes_so_that_nats_takes_it() -> None:
    """Large transactions handled in one turn: 39 of 37 kB once made one package over
    NATS's 1 MiB, refused ("package not sent"), every one of them then timing out."""
    nc = Recorder()
    p = packer(nc)
    big = proto.Submit(1, b"x" * 37_000)
    for _ in range(40):
        p.send("w.1", big)
    await turn()
    sizes = [len(proto.encode(proto.Package(1, 0, "w.0", 1, items))) for _, items in nc.sent]
    assert sum(len(items) for _, items in nc.sent) == 40 and len(sizes) >= 3
    assert max(sizes) <= proto.MAX_PACKAGE_BYTES + 40_000 < 1 << 20
