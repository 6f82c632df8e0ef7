"""The partition state machine on one core: apply, verify and codec rates.

    python bench/ledger.py --json bench/results/ledger.json

Figures (medians of --runs runs):
  apply_tps_nosig        prepare+commit of 1-in-2-out transactions, no signature checks
  apply_tps_nosig_2in    the same for 2-in-2-out
  apply_tps_sig          prepare (verifying the signature) + commit, 1-in-2-out
  apply_tps_sig_2in      the same for 2-in-2-out (two signatures per transaction)
  codec_roundtrips_per_s encode + decode (with every stateless check) of a 1-in-2-out tx
  verify_per_s_raw       coincurve alone: PublicKeyXOnly(key).verify(sig, msg) from bytes
  sig_ratio              apply_tps_sig / verify_per_s_raw (target >= 0.75)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coincurve import PublicKeyXOnly

from bench.common import median, print_table, write_json
from constellation.keys import SigningKey, XOnlyPubKey
from constellation.ledger import PartitionState
from constellation.sighash import sighash, sign_transaction
from constellation.tx import (
    PARTITIONS,
    Issuance,
    Transaction,
    TxInput,
    TxOutput,
    decode_transaction,
)


def _funded_state(n_coins: int, owner: SigningKey) -> tuple[PartitionState, list[bytes]]:
    issuer = SigningKey(b"\x01" * 32)
    state = PartitionState(range(PARTITIONS), [issuer.pubkey])
    ids: list[bytes] = []
    per = 256
    for nonce in range(0, n_coins, per):
        count = min(per, n_coins - nonce)
        iss = Issuance(issuer.pubkey, nonce, [TxOutput(10_000, owner.pubkey)] * count)
        ids += state.issue(iss.signed_by(issuer.secret))
    return state, ids


def _transactions(
    ids: list[bytes], n_in: int, owner: SigningKey, payees: list[XOnlyPubKey], signed: bool
) -> list[Transaction]:
    txs = []
    for k in range(len(ids) // n_in):
        inputs = [TxInput(c, 10_000) for c in ids[k * n_in : (k + 1) * n_in]]
        total = 10_000 * n_in
        outputs = [
            TxOutput(total // 2, payees[k % len(payees)]),
            TxOutput(total - total // 2 - 10, payees[(k + 1) % len(payees)]),
        ]
        tx = Transaction(inputs, outputs, 10)
        txs.append(sign_transaction(tx, [owner] * n_in) if signed else tx)
    return txs


def apply_rate(n_txs: int, n_in: int, verify: bool) -> float:
    owner = SigningKey(b"\x02" * 32)
    payees = [SigningKey(bytes([3 + i]) * 32).pubkey for i in range(8)]
    state, ids = _funded_state(n_txs * n_in, owner)
    txs = _transactions(ids, n_in, owner, payees, signed=verify)
    prepare, commit = state.prepare, state.commit
    gc.collect()
    gc.disable()
    start = time.process_time()
    for tx in txs:
        prepare(tx, verify)
        commit(tx.txid)
    elapsed = time.process_time() - start
    gc.enable()
    state.check_invariants()
    assert len(state.spent) == n_txs * n_in
    return len(txs) / elapsed


def codec_rate(n: int) -> float:
    owner = SigningKey(b"\x02" * 32)
    payee = SigningKey(b"\x03" * 32).pubkey
    tx = sign_transaction(
        Transaction([TxInput(os.urandom(32), 10_000)], [TxOutput(5_000, payee)] * 2), [owner]
    )
    start = time.process_time()
    for _ in range(n):
        decode_transaction(tx.encode())
    return n / (time.process_time() - start)


def verify_rate(n: int) -> float:
    keys = [SigningKey(os.urandom(32)) for _ in range(16)]
    items = []
    for i in range(n):
        key = keys[i % len(keys)]
        msg = sighash(os.urandom(32), 0, 10_000, key.pubkey)
        items.append((key.pubkey, key.sign(msg), msg))
    start = time.process_time()
    for pubkey, sig, msg in items:
        assert PublicKeyXOnly(pubkey).verify(sig, msg)
    return n / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--txs", type=int, default=40_000, help="transactions per no-sig run")
    parser.add_argument("--sig-txs", type=int, default=4_000, help="transactions per sig run")
    args = parser.parse_args()

    runs: dict[str, list[float]] = {}
    measures: tuple[tuple[str, Callable[[], float]], ...] = (
        ("apply_tps_nosig", lambda: apply_rate(args.txs, 1, False)),
        ("apply_tps_nosig_2in", lambda: apply_rate(args.txs, 2, False)),
        ("verify_per_s_raw", lambda: verify_rate(args.sig_txs)),
        ("apply_tps_sig", lambda: apply_rate(args.sig_txs, 1, True)),
        ("apply_tps_sig_2in", lambda: apply_rate(args.sig_txs, 2, True)),
        ("codec_roundtrips_per_s", lambda: codec_rate(args.sig_txs * 5)),
    )
    for _ in range(args.runs):
        for name, rate in measures:
            runs.setdefault(name, []).append(rate())
    figures: dict[str, float] = {name: round(median(v), 1) for name, v in runs.items()}
    # Paired per run (verify and apply measured back to back), then the median: the
    # machine's speed drifts between runs far more than within one.
    ratios = [a / v for a, v in zip(runs["apply_tps_sig"], runs["verify_per_s_raw"], strict=True)]
    figures["sig_ratio"] = round(median(ratios), 3)
    targets = {
        "apply_tps_nosig": ">= 100,000",
        "sig_ratio": ">= 0.75",
    }
    rows = [
        (
            name,
            f"{value:,.3f}" if name == "sig_ratio" else f"{value:,.0f}",
            f"target {targets[name]}" if name in targets else "",
        )
        for name, value in figures.items()
    ]
    print_table(f"ledger on one core, median of {args.runs} runs (CPU time)", rows)
    write_json(args.json, {**figures, "runs": runs})


if __name__ == "__main__":
    main()
