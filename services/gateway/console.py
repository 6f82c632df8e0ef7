"""The operator console's data (``/v1/console``): one operator's processes, whether each
is up and ready, and the figures its Grafana dashboards show, read from each process's
``/readyz`` and Prometheus ``/metrics`` at the moment of the request.

Read-only. A request needs the console's token (``Authorization: Bearer ...``, from the
operator's Secret), compared in constant time; every request is logged, refused or not.
Without a token configured the console is off (404).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.errors import NOT_FOUND, UNAUTHORIZED, ApiError, json_response

log = logging.getLogger("gateway.console")

DNS = "dns+"
SCRAPE_TIMEOUT_S = 2.0
MAX_SCRAPE_BYTES = 8 << 20  # of one process's /metrics
# The console's panels, and the metric families each shows (gauges and counters; of a
# histogram, its count and sum): what the Grafana dashboards show, by the same names.
PANELS: dict[str, tuple[str, ...]] = {
    "Ledger": (
        "worker_block_height",
        "worker_committed_txs_total",
        "worker_aborted_txs_total",
        "worker_queue_depth",
        "gateway_txs_total",
        "gateway_queue_depth",
        "gateway_websockets",
    ),
    "Replication": (
        "replica_term",
        "replica_leading",
        "replica_confirmed_height",
        "replica_lag_blocks",
        "replica_seconds_since_confirmed",
        "replica_elections_total",
        "replica_evidence",
        "replica_refused_blocks_total",
        "replica_voters",
        "replica_learners",
    ),
    "Settlement": (
        "gateway_settle_leading",
        "gateway_settle_pending_outputs",
        "gateway_settle_pending_age_seconds",
        "gateway_settle_untaken_outputs",
        "gateway_settle_owed_msat_total",
        "gateway_settle_paid_msat_total",
        "gateway_settle_failures_total",
        "gateway_lightning_up",
        "gateway_lightning_channel_msat",
    ),
    "Reserve": ("gateway_reserve_ok", "gateway_reserve_msat", "gateway_lightning_msat"),
    "Mint": (
        "mint_operations_total",
        "mint_pending_melts",
        "mint_oldest_pending_melt_seconds",
        "mint_outstanding",
        "mint_withdrawals_open",
    ),
    "Signer": (
        "signer_sessions_started_total",
        "signer_sessions_finished_total",
        "signer_signer_failures_total",
        "signer_pending_requests",
        "signer_requests_refused_total",
        "signer_dkg_runs_total",
    ),
}
_PANEL_OF = {family: panel for panel, families in PANELS.items() for family in families}


def parse_targets(text: str) -> dict[str, str]:
    """``GATEWAY_CONSOLE_TARGETS``: ``name=http://host:port`` pairs, comma-separated (each
    a process's ops server); ``name=dns+http://host:port`` stands for every address the
    name resolves to when the console is asked (a headless Service: its pods)."""
    targets: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, url = part.partition("=")
        if not eq or not name or not url.removeprefix(DNS).startswith(("http://", "https://")):
            raise ValueError(f"a console target is name=http://host:port, not {part!r}")
        targets[name] = url.rstrip("/")
    return targets


async def resolved(targets: Mapping[str, str]) -> list[tuple[str, str]]:
    """The targets, each ``dns+`` one as one target per address its host has now."""
    found: list[tuple[str, str]] = []
    loop = asyncio.get_running_loop()
    for name, url in targets.items():
        if not url.startswith(DNS):
            found.append((name, url))
            continue
        parts = urlsplit(url.removeprefix(DNS))
        try:
            infos = await loop.getaddrinfo(parts.hostname, parts.port, type=socket.SOCK_STREAM)
        except OSError:
            found.append((name, url.removeprefix(DNS)))  # shown as down, with the error
            continue
        for ip in sorted({str(info[4][0]) for info in infos}):
            host = f"[{ip}]" if ":" in ip else ip
            found.append((f"{name} {ip}", f"{parts.scheme}://{host}:{parts.port}"))
    return found


def summarize(metrics_text: str) -> dict[str, list[dict[str, Any]]]:
    """The samples of the console's families in one process's metrics, by panel."""
    panels: dict[str, list[dict[str, Any]]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            name = sample.name
            panel = _PANEL_OF.get(name) or _PANEL_OF.get(family.name)
            if panel is None or name.endswith(("_bucket", "_created")):
                continue
            panels.setdefault(panel, []).append(
                {"name": name, "labels": sample.labels, "value": sample.value}
            )
    return panels


class Console:
    def __init__(
        self, token: str, targets: Mapping[str, str], grafana_url: str, operator: str
    ) -> None:
        self.token = token.encode()
        self.targets = dict(targets)
        self.grafana_url = grafana_url
        self.operator = operator

    def install(self, app: web.Application) -> None:
        app.router.add_get("/v1/console", self.get_console)

    def _authorize(self, request: web.Request) -> None:
        if not self.token:
            raise ApiError(NOT_FOUND, "this gateway has no operator console (no token set)")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), self.token):
            raise ApiError(UNAUTHORIZED, "the console needs the operator's token (Bearer)")

    async def get_console(self, request: web.Request) -> web.Response:
        try:
            self._authorize(request)
        except ApiError as exc:
            log.info(
                "console request refused",
                extra={"remote": request.remote, "path": request.path_qs, "code": exc.code},
            )
            raise
        log.info("console request", extra={"remote": request.remote, "path": request.path_qs})
        return json_response(await self.overview())

    async def overview(self) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            targets = await resolved(self.targets)
            found = await asyncio.gather(
                *(self._scrape(session, name, url) for name, url in targets)
            )
        doc: dict[str, Any] = {
            "operator": self.operator,
            "panels": list(PANELS),
            "processes": found,
        }
        if self.grafana_url:
            doc["grafana"] = self.grafana_url
        return doc

    async def _scrape(self, session: aiohttp.ClientSession, name: str, url: str) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": name, "url": url, "up": False, "ready": False}
        try:
            async with session.get(url + "/readyz") as r:
                doc["up"] = True
                doc["ready"] = r.status == 200
                doc["readiness"] = (await r.content.read(4096)).decode(errors="replace")
            async with session.get(url + "/metrics") as r:
                text = (await r.content.read(MAX_SCRAPE_BYTES)).decode(errors="replace")
            doc["metrics"] = summarize(text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            doc["error"] = f"{type(exc).__name__}: {exc}"
        return doc
