"""Helpers shared by the benchmarks: repeated runs, medians, a table and a JSON file."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from constellation.keys import SigningKey
from constellation.sighash import sign_transaction
from constellation.tx import Issuance, Transaction, TxInput, TxOutput

ISSUER = SigningKey(b"\x07" * 32)
OWNER = SigningKey(b"\x01" * 32)
ISSUE_CHUNK = 250


def single_worker_payments(count: int) -> tuple[list[bytes], list[bytes]]:
    """Encoded issuances (of ``ISSUE_CHUNK`` coins each, to ``OWNER``) and ``count``
    (rounded down to whole issuances) signed 1-in-2-out payments spending those coins."""
    issuances, txs = [], []
    for nonce in range(count // ISSUE_CHUNK):
        issuance = Issuance(ISSUER.pubkey, nonce, [TxOutput(1_000, OWNER.pubkey)] * ISSUE_CHUNK)
        issuance = issuance.signed_by(ISSUER.secret)
        issuances.append(issuance.encode())
        for cid in issuance.output_ids:
            tx = Transaction(
                [TxInput(cid, 1_000)],
                [TxOutput(400, OWNER.pubkey), TxOutput(500, OWNER.pubkey)],
                100,
            )
            txs.append(sign_transaction(tx, [OWNER]).encode())
    return issuances, txs


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    """Rows of (figure, value, note), aligned."""
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(title)
    print("-" * len(title))
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>{vwidth}}  {note}")


def write_json(path: str | None, figures: dict[str, Any]) -> None:
    if path is None:
        return
    figures = {
        **figures,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
