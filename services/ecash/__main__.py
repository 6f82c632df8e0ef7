"""``python -m services.ecash``: an operator's Cashu mint (see ``app.py``)."""

from __future__ import annotations

import sys

from services.ecash.app import MintApp
from services.ecash.config import Settings
from services.runtime import serve

if __name__ == "__main__":
    sys.exit(serve(lambda _: "mint", Settings.from_env, lambda s: MintApp(s).run))
