"""A PostgreSQL server of a test's own, started by the project's devnet helper."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from services import devnet
from services.devnet import Devnet


@contextlib.asynccontextmanager
async def throwaway_postgres(name: str) -> AsyncIterator[str]:
    """A fresh server in a temporary folder, for as long as the block runs: its URL."""
    with tempfile.TemporaryDirectory(prefix=f"{name}-", dir="/tmp") as tmp:
        os.chmod(tmp, 0o755)  # PostgreSQL runs as its own user where we are root
        server = Devnet(str(Path(tmp) / "pg"), name, 0, os.urandom(32).hex())
        Path(server.dir).mkdir()
        server.pg_port = devnet.free_port()
        await asyncio.to_thread(devnet.start_postgres, server)
        try:
            yield server.database_url
        finally:
            devnet.stop_pid(server.pg_pid, 10, signal.SIGINT)
