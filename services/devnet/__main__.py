"""``python -m services.devnet supervise DIR``: the supervisor of the devnet in DIR
(``devnet up`` starts it; ``devnet down`` stops it)."""

from __future__ import annotations

import sys
from pathlib import Path

from services.devnet.supervisor import main

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "supervise":
        print("usage: python -m services.devnet supervise DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[2]).resolve()))
