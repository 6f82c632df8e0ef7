"""The partition state machine on one core: apply, verify and codec rates.

    python bench/ledger.py --json bench/results/ledger.json

Figures (medians of --runs runs):
  apply_tps_nosig        prepare+commit of 1-in-2-out transactions, no signature checks
  apply_tps_nosig_2in    the same for 2-in-2-out
  apply_tps_sig          prepare (verifying the signature) + commit, 1-in-2-out
  apply_tps_sig_2in      the same for 2-in-2-out (two signatures per transaction)
  codec_roundtrips_per_s encode + decode (with every stateless check) of a 1-in-2-out tx
  verify_per_s_raw       coincurve alone over the same signatures, interleaved with the
                         apply: PublicKeyXOnly(key).verify(sig, msg) from bytes
  sig_ratio              apply_tps_sig / verify_per_s_raw, per run (target >= 0.75)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
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


def _setup(n_txs: int, n_in: int, signed: bool) -> tuple[PartitionState, list[Transaction]]:
    owner = SigningKey(b"\x02" * 32)
    payees = [SigningKey(bytes([3 + i]) * 32).pubkey for i in range(8)]
    state, ids = _funded_state(n_txs * n_in, owner)
    return state, _transactions(ids, n_in, owner, payees, signed=signed)


def apply_rate(n_txs: int, n_in: int) -> float:
    """prepare+commit without signature checks, transactions per CPU second."""
    state, txs = _setup(n_txs, n_in, signed=False)
    prepare, commit = state.prepare, state.commit
    gc.collect()
    gc.disable()
    start = time.process_time()
    for tx in txs:
        prepare(tx, False)
        commit(tx.txid)
    elapsed = time.process_time() - start
    gc.enable()
    state.check_invariants()
    assert len(state.spent) == n_txs * n_in
    return len(txs) / elapsed


def sig_rates(n_txs: int, n_in: int, block: int = 200) -> tuple[float, float]:
    """(apply with signature checks, coincurve verify alone) per CPU second.

    Both run over the same signatures, alternating in small blocks, so that the
    machine's drifting speed (two shared cores) falls on both alike. The raw figure is
    coincurve's public API from bytes: parse the x-only key, then verify.
    """
    state, txs = _setup(n_txs, n_in, signed=True)
    items = [
        (owner, tx.witnesses[i], sighash(tx.txid, i, value, owner))
        for tx in txs
        for i, (cid, value) in enumerate(tx.inputs)
        for _, owner in [state.coins[cid]]
    ]
    prepare, commit = state.prepare, state.commit
    t_apply = t_raw = 0.0
    gc.collect()
    gc.disable()
    for k in range(0, len(txs), block):
        start = time.process_time()
        for pubkey, sig, msg in items[k * n_in : (k + block) * n_in]:
            assert PublicKeyXOnly(pubkey).verify(sig, msg)
        mid = time.process_time()
        for tx in txs[k : k + block]:
            prepare(tx, True)
            commit(tx.txid)
        t_raw += mid - start
        t_apply += time.process_time() - mid
    gc.enable()
    state.check_invariants()
    return len(txs) / t_apply, len(items) / t_raw


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--txs", type=int, default=40_000, help="transactions per no-sig run")
    parser.add_argument("--sig-txs", type=int, default=4_000, help="transactions per sig run")
    args = parser.parse_args()

    runs: dict[str, list[float]] = {}
    for _ in range(args.runs):
        runs.setdefault("apply_tps_nosig", []).append(apply_rate(args.txs, 1))
        runs.setdefault("apply_tps_nosig_2in", []).append(apply_rate(args.txs, 2))
        sig, raw = sig_rates(args.sig_txs, 1)
        runs.setdefault("apply_tps_sig", []).append(sig)
        runs.setdefault("verify_per_s_raw", []).append(raw)
        runs.setdefault("sig_ratio", []).append(sig / raw)
        runs.setdefault("apply_tps_sig_2in", []).append(sig_rates(args.sig_txs, 2)[0])
        runs.setdefault("codec_roundtrips_per_s", []).append(codec_rate(args.sig_txs * 5))
    figures = {name: round(median(v), 3 if name == "sig_ratio" else 1) for name, v in runs.items()}
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
