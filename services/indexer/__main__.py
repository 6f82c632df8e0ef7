"""``python -m services.indexer``: the history index's writer, its own process.

It follows every worker's events log by height (``services.follow``) into PostgreSQL,
which the gateways read for history and address queries; it is ready while it is no
more than ``INDEXER_MAX_BEHIND`` blocks behind any worker and its following goes round
(not stuck for ``INDEXER_STALL_S``, e.g. on a database that hangs). Kept apart from the
gateway so indexing never takes CPU from answering payments, and scales on its own.
"""

from __future__ import annotations

import sys

from services.indexer.app import Indexer
from services.indexer.config import Settings
from services.runtime import serve

if __name__ == "__main__":
    sys.exit(serve(lambda _: "indexer", Settings.from_env, lambda s: Indexer(s).run))
