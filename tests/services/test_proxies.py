"""Behind a load balancer or an ingress, every request comes from the proxy: rate limits
and logs count by the client it names in X-Forwarded-For, where (and only where) the
proxy is trusted (``*_TRUSTED_PROXIES``)."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from services.runtime import OpsServer, client_address

LB = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),  # not a proxy: its header is its say
        ("10.0.0.5", [], "10.0.0.5"),  # a proxy that names no one
        ("10.0.0.5", ["198.51.100.1"], "198.51.100.1"),
        ("10.0.0.5", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),  # the client's own claim
        ("10.0.0.5", ["6.6.6.6", "198.51.100.1, 10.0.0.7"], "198.51.100.1"),  # two proxies
        ("fd00::1", ["2001:db8::7"], "2001:db8::7"),
        ("10.0.0.5", ["10.0.0.6, 10.0.0.7"], "10.0.0.6"),  # proxies all the way
        ("10.0.0.5", ["not-an-address"], "not-an-address"),
    ],
)
def test_the_client_is_the_nearest_address_no_trusted_proxy_has(
    peer: str, forwarded: list[str], client: str
) -> None:
    assert client_address(peer, forwarded, LB) == client


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    assert client_address("10.0.0.5", ["198.51.100.1"], []) == "10.0.0.5"


@pytest.fixture
async def remote_of() -> AsyncIterator[dict[str, str]]:
    """URLs of two servers answering each request's ``remote``: one trusting loopback
    as its proxy, one trusting none."""
    servers = {
        "trusting": OpsServer(
            CollectorRegistry(), lambda: (True, ""), 1 << 20, [ipaddress.ip_network("127.0.0.1/32")]
        ),
        "plain": OpsServer(CollectorRegistry(), lambda: (True, "")),
    }

    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=request.remote or "")

    urls = {}
    for name, ops in servers.items():
        ops.app.router.add_get("/remote", echo)
        await ops.start("127.0.0.1", 0)
        urls[name] = f"http://127.0.0.1:{ops.port}/remote"
    yield urls
    for ops in servers.values():
        await ops.stop()


async def test_a_trusted_proxys_client_is_the_requests_remote(remote_of: dict[str, str]) -> None:
    headers = {"X-Forwarded-For": "6.6.6.6, 198.51.100.1"}
    async with aiohttp.ClientSession() as s:
        async with s.get(remote_of["trusting"], headers=headers) as r:
            assert await r.text() == "198.51.100.1"
        async with s.get(remote_of["plain"], headers=headers) as r:
            assert await r.text() == "127.0.0.1"
        async with s.get(remote_of["trusting"]) as r:
            assert await r.text() == "127.0.0.1"
