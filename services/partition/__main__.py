"""``python -m services.partition``: settings from the environment, then run until SIGTERM."""

from __future__ import annotations

import os
import sys

from services.partition.app import WorkerNode
from services.partition.config import Settings
from services.runtime import ConfigError, run


def main() -> int:
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 2
    return run(f"worker-{settings.worker}", settings.log_level, lambda: WorkerNode(settings).run)


if __name__ == "__main__":
    sys.exit(main())
