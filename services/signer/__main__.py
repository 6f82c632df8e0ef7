"""``python -m services.signer``: settings from the environment, then run until SIGTERM."""

from __future__ import annotations

import os
import sys

from services.runtime import ConfigError, run
from services.signer.app import SignerNode
from services.signer.config import Settings


def main() -> int:
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        print(f"signer: {exc}", file=sys.stderr)
        return 2
    return run("signer", settings.log_level, lambda: SignerNode(settings).run)


if __name__ == "__main__":
    sys.exit(main())
