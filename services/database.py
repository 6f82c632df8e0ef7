"""What a service takes for its PostgreSQL being unreachable (down, starting again, its
connection cut or closed) rather than for a bug: a request says so (the caller tries
again), a task waits it out with a warning, and an error of any other kind is an error."""

from __future__ import annotations

import asyncpg

DATABASE_DOWN: tuple[type[Exception], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # asyncpg's, using a connection whose server died mid-operation ("cannot switch to
    # state N; another operation is in progress")
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
    OSError,
)
