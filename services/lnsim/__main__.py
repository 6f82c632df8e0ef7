"""``python -m services.lnsim``: a simulated Lightning network, until SIGTERM."""

from __future__ import annotations

import sys

from services.lnsim.app import LnSimNode
from services.lnsim.config import Settings
from services.runtime import serve

if __name__ == "__main__":
    sys.exit(serve(lambda _: "lnsim", Settings.from_env, lambda s: LnSimNode(s).run))
