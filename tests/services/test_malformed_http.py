"""A request the HTTP parser refuses is answered 400 and logged in one line at info,
not as an error with a traceback (the gateway's fuzzing test reads its log for those)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import web

from services.runtime import MalformedHttp


async def test_a_line_too_long_is_a_400_and_one_quiet_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logging.getLogger("aiohttp.server").addFilter(MalformedHttp())
    app = web.Application()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            status = await reader.readline()
            writer.close()
            await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()
    assert b" 400 " in status
    said = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert said and all(r.levelno == logging.INFO and not r.exc_info for r in said)
    assert "malformed request answered 400" in said[0].getMessage()
