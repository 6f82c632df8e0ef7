"""``python -m services.gateway``: settings from the environment, then run until SIGTERM."""

from __future__ import annotations

import sys

from services.gateway.app import GatewayNode
from services.gateway.config import Settings
from services.runtime import serve

if __name__ == "__main__":
    sys.exit(serve(lambda _: "gateway", Settings.from_env, lambda s: GatewayNode(s).run))
