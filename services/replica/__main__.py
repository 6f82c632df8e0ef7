"""``python -m services.replica``: one machine's copies, until SIGTERM."""

from __future__ import annotations

import sys

from services.replica.app import Machine
from services.replica.config import Settings
from services.runtime import serve

if __name__ == "__main__":
    sys.exit(
        serve(
            lambda s: f"replica-{s.name}-{s.machine}", Settings.from_env, lambda s: Machine(s).run
        )
    )
