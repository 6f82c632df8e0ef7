"""``python -m services.signer``: settings from the environment, then run until SIGTERM."""

from __future__ import annotations

import sys

from services.runtime import serve
from services.signer.app import SignerNode
from services.signer.config import Settings

if __name__ == "__main__":
    sys.exit(serve(lambda _: "signer", Settings.from_env, lambda s: SignerNode(s).run))
