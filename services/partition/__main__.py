"""``python -m services.partition``: settings from the environment, then run until SIGTERM."""

from __future__ import annotations

import sys

from services.partition.app import WorkerNode
from services.partition.config import Settings
from services.runtime import serve

if __name__ == "__main__":
    sys.exit(serve(lambda s: f"worker-{s.worker}", Settings.from_env, lambda s: WorkerNode(s).run))
