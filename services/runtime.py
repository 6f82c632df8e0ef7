"""What every service shares: environment config, JSON logs, the ops HTTP server,
supervised background tasks, SIGTERM.

One way to start a process: ``serve(service, from_env, node)`` reads the settings,
configures logging, builds the service, installs the signal handlers and runs its
``main(stop)``, which returns once ``stop`` is set and it has drained. ``OpsServer``
serves ``/healthz``, ``/readyz`` and ``/metrics``; its ``tasks`` run the service's
long-running tasks and restart any that dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import nats
import uvloop
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from nats.aio.client import Client
from nats.errors import Error as NatsError
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

OPERATOR_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
RECONNECT_S = 0.5  # between a NATS client's attempts to reconnect


class ConfigError(ValueError):
    """A missing or invalid environment variable: the process refuses to start."""


def env_str(env: Mapping[str, str], name: str, default: str | None = None) -> str:
    value = env.get(name, default)
    if value is None or value == "":
        raise ConfigError(f"{name} must be set")
    return value


def env_int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be in {lo}..{hi}, got {value}")
    return value


def env_operator(env: Mapping[str, str], name: str) -> str:
    operator = env_str(env, name, "local")
    if not OPERATOR_RE.match(operator):
        raise ConfigError(f"{name} must match {OPERATOR_RE.pattern}, got {operator!r}")
    return operator


def env_addr(env: Mapping[str, str], name: str, default: str) -> tuple[str, int]:
    raw = env.get(name) or default
    host, sep, port = raw.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
        raise ConfigError(f"{name} must be HOST:PORT, got {raw!r}")
    return host or "127.0.0.1", int(port)


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def env_networks(env: Mapping[str, str], name: str) -> tuple[IpNetwork, ...]:
    """Comma-separated addresses or networks (``10.0.0.0/8,fd00::/8``); none by default."""
    try:
        return tuple(
            ipaddress.ip_network(item.strip())
            for item in env.get(name, "").split(",")
            if item.strip()
        )
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def client_address(peer: str, forwarded: Sequence[str], trusted: Sequence[IpNetwork]) -> str:
    """The address a request came from: its peer's, unless the peer is one of the
    ``trusted`` proxies (a load balancer, an ingress): then the nearest address in
    ``X-Forwarded-For`` (its headers, in order) that is not one of them. Each proxy
    appends the address it was reached from; what stands left of that, the client
    wrote itself, and is not believed."""
    hops = [h.strip() for line in forwarded for h in line.split(",") if h.strip()]
    address = peer
    while _among(address, trusted) and hops:
        address = hops.pop()
    return address


def _among(address: str, networks: Sequence[IpNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # not an address: no proxy of ours wrote it
    return any(ip in n for n in networks)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, service, event, and the record's extras."""

    _standard = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "service": self.service,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._standard:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class MalformedHttp(logging.Filter):
    """aiohttp logs a request it could not parse (a line too long, a bad header), which
    it answers 400, as an error with its traceback: that is a client's mistake, said in
    one line at info."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = f"malformed request answered 400: {exc.message}", ()
            record.exc_info, record.exc_text = None, None
        return True


def configure_logging(service: str, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.server").addFilter(MalformedHttp())


def now_ms() -> int:
    """The services' one wall clock (message timestamps are checked against it)."""
    return time.time_ns() // 1_000_000


_log = logging.getLogger("runtime")

EXIT_INVARIANT = 70  # EX_SOFTWARE: a broken invariant stops the process


def unhandled(exc: BaseException, where: str) -> None:
    """An exception that no task or handler took (a loop callback's, a NATS
    subscription's): logged with its traceback; a broken invariant (``AssertionError``)
    stops the process, which its supervisor restarts from its durable state."""
    if isinstance(exc, AssertionError):
        _log.critical("an invariant broke; stopping", extra={"where": where}, exc_info=exc)
        logging.shutdown()
        os._exit(EXIT_INVARIANT)
    _log.error("unhandled error", extra={"where": where}, exc_info=exc)


async def connect_nats(url: str, name: str, **options: Any) -> Client:
    """A service's connection to NATS: it connects and reconnects for ever (unless
    ``max_reconnect_attempts`` says otherwise), twice a second, and says in one line when
    the connection drops (``options``: more of ``nats.connect``'s)."""
    given = {"max_reconnect_attempts": -1, "reconnect_time_wait": RECONNECT_S, **options}
    return await nats.connect(url, name=name, error_cb=nats_error, **given)


async def connect_peer(url: str, name: str, peer: str, **options: Any) -> Client:
    """A connection to another operator's NATS, with the credentials in ``url`` it
    issued us: tried every ``RECONNECT_S`` until it answers (said once at debug level
    each time); the client reconnects by itself afterwards."""
    while True:
        try:
            client = await connect_nats(url, name, connect_timeout=2, **options)
        except (NatsError, OSError, TimeoutError) as exc:
            _log.debug("peer unreachable", extra={"peer": peer, "error": repr(exc)})
            await asyncio.sleep(RECONNECT_S)
            continue
        _log.info("connected to peer", extra={"peer": peer, "as": name})
        return client


async def close_nats(client: Client, drain: bool = False) -> None:
    """Close a NATS connection (``drain``: first let the callbacks that started finish
    and send what is pending), whatever became of its server. A client whose server
    died is reconnecting, and refuses to drain; under uvloop its close raises
    RuntimeError as it flushes what was pending onto the dead socket, though the client
    is closed by then (it no longer reconnects). Either is said in one line, not raised:
    on the way out, a service's peer or its own server may already be gone."""
    if drain:
        try:
            await client.drain()
            return
        except (NatsError, OSError, RuntimeError) as exc:
            _log.info("nats connection not drained", extra={"error": repr(exc)})
    try:
        await client.close()
    except (NatsError, OSError, RuntimeError) as exc:
        _log.info("nats connection closed with its server gone", extra={"error": repr(exc)})


async def nats_error(exc: Exception) -> None:
    """The NATS client's ``error_cb``. A lost or refused connection is said in one line
    (the client reconnects by itself); anything else came from a subscription's callback
    that nothing handled."""
    if isinstance(exc, NatsError | OSError):
        _log.warning("nats connection", extra={"error": repr(exc)})
        return
    unhandled(exc, "nats")


# A failed task waits this long before it runs again, doubling up to the maximum; the
# wait starts over once a task has run for TASK_HEALTHY_S without failing.
TASK_BACKOFF_S = 0.1
TASK_BACKOFF_MAX_S = 10.0
TASK_HEALTHY_S = 30.0


class Tasks:
    """A service's long-running tasks, supervised.

    A task that dies (raises, or returns: none of them ever should) is logged once with
    its traceback, counted in ``task_failures_total{task}``, makes the service not ready
    until it runs again, and is restarted after a backoff. Nothing dies unnoticed: the
    indexer once stopped indexing while its process stayed up and ready.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.failures = Counter(
            "task_failures",
            "tasks that died, by task (a long-running one is restarted)",
            ["task"],
            registry=registry,
        )
        self.down: dict[str, str] = {}  # task -> why, while it waits to run again
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run ``run()`` as the task ``name`` until ``stop``, restarting it if it dies."""
        assert name not in self._tasks, f"task {name} started twice"
        self._tasks[name] = asyncio.create_task(self._keep(name, run), name=name)

    async def _keep(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        backoff = TASK_BACKOFF_S
        while True:
            started = loop.time()
            try:
                await run()
                why = "it returned"
                _log.error("task ended", extra={"task": name})
            except Exception as exc:  # a dying task of any kind is this class's business
                why = f"{type(exc).__name__}: {exc}"
                _log.exception("task failed", extra={"task": name})
            self.failures.labels(name).inc()
            if loop.time() - started >= TASK_HEALTHY_S:
                backoff = TASK_BACKOFF_S
            self.down[name] = f"task {name} failed ({why}); restarting in {backoff:g} s"
            try:
                await asyncio.sleep(backoff)
            finally:  # restarted, or stopped while it waited: it is no longer down
                del self.down[name]
            backoff = min(backoff * 2, TASK_BACKOFF_MAX_S)
            _log.info("task restarted", extra={"task": name})

    def watch(self, name: str, task: asyncio.Task[Any]) -> None:
        """A short-lived task (one request's, one connection's): if it fails, it is
        logged once with its traceback and counted, like a long-running one."""
        task.add_done_callback(lambda done: self._ended(name, done))

    def _ended(self, name: str, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self.failures.labels(name).inc()
        _log.error("task failed", extra={"task": name}, exc_info=task.exception())

    async def stop(self, *names: str) -> None:
        """Cancel the named tasks (every task, if none is named) and wait for them. A
        task still running a second later is cancelled again: a cancel can be lost (in
        Python 3.11 an await may return a result that came with it), and a service that
        waited for it would not stop on SIGTERM. So is every task of the loop that was
        cancelled and still runs: a task group cancels its tasks once, and waits for them
        (an indexer's checkpoints task waited out its 10 s grace for a shard's reader
        whose cancel came with the reply it waited for)."""
        stopping = [self._tasks.pop(n) for n in names or list(self._tasks) if n in self._tasks]
        pending = set(stopping)
        here = asyncio.current_task()
        lost: set[asyncio.Task[Any]] = set()
        while pending:
            for task in pending | lost:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=1.0)
            if pending:
                lost = {t for t in asyncio.all_tasks() if t is not here and t.cancelling()}
                _log.warning(
                    "tasks still stopping",
                    extra={"tasks": [t.get_name() for t in pending], "waiting": _waiting()},
                )


def raise_lost_cancel() -> None:
    """Raise the cancel that an await just returned through: in Python 3.11,
    ``asyncio.wait_for`` (a NATS request's) returns a result that came with a cancel and
    drops the cancel. Called after such an await in a loop, the loop stops at once."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _waiting() -> list[str]:
    """Where each other task of this loop waits (its coroutines, outermost first, and the
    line of the innermost): a task that does not stop when cancelled is one of them, or
    waits on one."""
    here = asyncio.current_task()
    found = []
    for task in asyncio.all_tasks():
        if task is here or task.done():
            continue
        frames = []
        awaited: Any = task.get_coro()
        while (frame := getattr(awaited, "cr_frame", None)) is not None:
            frames.append(frame)
            awaited = awaited.cr_await
        if frames:
            calls = " > ".join(f.f_code.co_name for f in frames)
            inner = frames[-1]
            found.append(
                f"{task.get_name()}: {calls} ({inner.f_code.co_filename}:{inner.f_lineno})"
            )
    return sorted(found)


class OpsServer:
    """``/healthz`` (the process runs), ``/readyz`` (it can do its work, and none of its
    tasks is down), ``/metrics``. Behind ``trusted_proxies``, a request's ``remote`` is
    its client's (``client_address``): what rate limits and logs count by."""

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], tuple[bool, str]],
        max_body: int = 1 << 20,
        trusted_proxies: Sequence[IpNetwork] = (),
    ) -> None:
        self.registry = registry
        self.ready = ready
        self.tasks = Tasks(registry)
        self.trusted_proxies = tuple(trusted_proxies)
        # none: no middleware (the busiest handlers pay for none)
        middlewares = [self._client] if self.trusted_proxies else []
        self.app = web.Application(client_max_size=max_body, middlewares=middlewares)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", self._metrics)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @web.middleware
    async def _client(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        forwarded = request.headers.getall("X-Forwarded-For", [])
        peer = request.remote or ""
        remote = client_address(peer, forwarded, self.trusted_proxies)
        return await handler(request if remote == peer else request.clone(remote=remote))

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def readiness(self) -> tuple[bool, str]:
        if self.tasks.down:
            return False, "; ".join(self.tasks.down.values())
        return self.ready()

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        ok, why = self.readiness()
        return web.json_response({"ready": ok, "reason": why}, status=200 if ok else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


class HasLogLevel(Protocol):
    @property
    def log_level(self) -> str: ...


S = TypeVar("S", bound=HasLogLevel)


def serve(
    service: Callable[[S], str],
    from_env: Callable[[Mapping[str, str]], S],
    node: Callable[[S], Callable[[asyncio.Event], Awaitable[None]]],
) -> int:
    """A service's ``main``: settings from the environment (exit 2, saying why, if they
    are refused), then ``run`` the node they configure."""
    try:
        settings = from_env(os.environ)
    except ConfigError as exc:
        print(f"{sys.argv[0]}: {exc}", file=sys.stderr)
        return 2
    return run(service(settings), settings.log_level, lambda: node(settings))


def run(
    service: str, level: str, build: Callable[[], Callable[[asyncio.Event], Awaitable[None]]]
) -> int:
    """Configure logs, ``build`` the service, run it until SIGTERM or SIGINT sets its stop
    event; returns the exit code (2 for a configuration the service refused)."""
    configure_logging(service, level)
    log = logging.getLogger(service)
    try:
        main = build()
    except ConfigError as exc:
        log.error("bad configuration", extra={"error": str(exc)})
        return 2

    async def until_stopped() -> None:
        # Fewer collections: the young generation is collected every 50,000 allocations
        # instead of 700 (the hot paths allocate many short-lived tuples).
        gc.set_threshold(50_000, 20, 20)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(
            lambda _, ctx: unhandled(ctx.get("exception") or RuntimeError(ctx["message"]), "loop")
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    # uvloop: the services spend much of their time in the event loop's socket and
    # timer handling, which it does in C.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(until_stopped())
    log.info("stopped", extra={"pid": os.getpid()})
    return 0


def sync_dir(path: Path) -> None:
    """fsync a folder: what was created, renamed or removed in it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """``path`` and the folders above it that are missing, created durably (each one's
    parent fsynced once it is made)."""
    if path.is_dir():
        return
    make_dirs(path.parent)
    with contextlib.suppress(FileExistsError):
        path.mkdir()
    sync_dir(path.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``, durably: a crash leaves the old file or the new
    (readable by its owner only)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_dir(path.parent)
