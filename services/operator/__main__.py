"""``python -m services.operator``: settings from the environment, then run until SIGTERM."""

from __future__ import annotations

import sys

from services.operator.app import OperatorNode
from services.operator.config import Settings
from services.runtime import serve

if __name__ == "__main__":
    sys.exit(serve(lambda _: "operator", Settings.from_env, lambda s: OperatorNode(s).run))
