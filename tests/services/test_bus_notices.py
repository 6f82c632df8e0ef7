"""The notices a machine waits on between reads of its operator's placement and
agreement (``services.bus.put_subject``): every put of either key is heard on its
subject, and puts of other keys of the bucket are not. Against a real nats-server with
JetStream: where a put goes is the server's and nats-py's doing, not ours."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Iterator
from pathlib import Path

import pytest
import uvloop
from nats.aio.msg import Msg

from constellation.replication import members as mb
from constellation.replication.placement import Placement
from services import devnet
from services.bus import (
    MEMBERS_KEY,
    PLACEMENT_KEY,
    SeenCopy,
    ensure_placement,
    publish_agreement,
    put_subject,
    report_members,
    update_placement,
)
from services.runtime import close_nats, connect_nats

OPERATOR = "op0"
HEARD_S = 2.0


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    port = devnet.free_port()
    argv = [devnet.nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)]
    argv += ["-js", "-sd", str(tmp_path / "js")]
    pid = devnet.spawn(argv, dict(os.environ), tmp_path / "nats.log")
    devnet.wait_tcp(port, 10)
    yield f"nats://127.0.0.1:{port}"
    devnet.stop_pid(pid, 5)


def test_each_put_of_the_placement_or_the_agreement_is_heard_and_no_other(url: str) -> None:
    async def run() -> list[str]:
        nc = await connect_nats(url, "test-notices")
        heard: list[str] = []
        arrived = asyncio.Event()

        async def note(msg: Msg) -> None:
            heard.append(msg.subject)
            arrived.set()

        async def put_then_hear(put: Awaitable[object]) -> None:
            arrived.clear()
            await put
            await asyncio.wait_for(arrived.wait(), HEARD_S)

        try:
            for key in (PLACEMENT_KEY, MEMBERS_KEY):
                await nc.subscribe(put_subject(OPERATOR, key), cb=note)
            first = Placement.initial(2, 2)
            await put_then_hear(ensure_placement(nc, OPERATOR, first))  # created: a put too
            moved = first.step(3)
            assert moved != first
            await put_then_hear(update_placement(nc, OPERATOR, moved, 1))
            await put_then_hear(publish_agreement(nc, OPERATOR, mb.Agreement([[0, 1, 2]])))
            # A machine's report of its copies' members goes to another key: unheard.
            arrived.clear()
            await report_members(nc, OPERATOR, 0, [SeenCopy("0/0", [0, 1], [], [], True)])
            await nc.flush()
            await asyncio.sleep(0.3)
            assert not arrived.is_set()
        finally:
            await close_nats(nc)
        return heard

    heard = uvloop.run(run())
    placement, members = put_subject(OPERATOR, PLACEMENT_KEY), put_subject(OPERATOR, MEMBERS_KEY)
    assert heard == [placement, placement, members]
