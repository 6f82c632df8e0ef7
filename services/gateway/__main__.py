"""``python -m services.gateway``: settings from the environment, then run until SIGTERM."""

from __future__ import annotations

import os
import sys

from services.gateway.app import GatewayNode
from services.gateway.config import Settings
from services.runtime import ConfigError, run


def main() -> int:
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    return run("gateway", settings.log_level, lambda: GatewayNode(settings).run)


if __name__ == "__main__":
    sys.exit(main())
