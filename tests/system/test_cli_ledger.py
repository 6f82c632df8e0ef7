"""The README's main command, the wallet commands against a devnet, ops endpoints, SIGTERM."""

from __future__ import annotations

import io
import json
import re
import time
import urllib.request
from contextlib import redirect_stdout
from pathlib import Path

from services import devnet
from services.cli import main


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read().decode()


def logs(folder: Path) -> str:
    """The tails of a failed run's logs (the demo keeps them when it fails)."""
    found = []
    for path in sorted(folder.rglob("*.log")):
        found.append(f"== {path}\n" + "\n".join(path.read_text().splitlines()[-15:]))
    return "\n".join(found)


def test_the_main_command_runs_a_guild_through_failures(devnet_root: Path) -> None:
    folder = devnet_root / "demo"
    code, out = cli("demo", "--payments", "150", "--clients", "8", "--dir", str(folder))
    assert code == 0, out + logs(folder)
    assert len(re.findall(r"payments: \d+ of (?:150|75) committed", out)) == 6
    assert "kill -9 the leader of op0/0" in out and "leads in term" in out
    assert re.search(r"op0/0: copy [2-5] at op[12] elected", out)
    assert "every copy caught up" in out and "guild demo: every check held" in out
    assert out.count(": conserved") == 6 and "NOT CONSERVED" not in out
    assert "Lightning: a simulated network of 4 nodes, one per operator and one for" in out
    # the money path: a deposit over Lightning into a coin, an invoice paid through the mint
    assert "deposit of 50000 sat: credited 50000000 msat as coin" in out
    assert re.search(r"payment of 12345 sat \(quote \S+\): PAID", out)
    assert "the merchant's node says of that invoice: paid" in out
    assert out.count("reserve holds") >= 3 and "MONEY PATH FAILED" not in out
    assert "its Lightning node went down with it (offline: op0)" in out
    assert re.search(r"Lightning books: [\d,]+ msat minted, all accounted for", out)
    assert not folder.exists()  # purged after the run


def test_the_demo_of_one_operator_pays_and_checks_the_ledger(devnet_root: Path) -> None:
    folder = devnet_root / "demo1"
    argv = ["--payments", "150", "--wallets", "6", "--coins", "5", "--clients", "8"]
    code, out = cli("demo", "--operators", "1", *argv, "--dir", str(folder))
    assert code == 0, out + logs(folder)
    assert re.search(r"payments: \d+ of 150 committed", out)
    assert "tx/s" in out and "confirm latency ms: p50" in out
    assert "double spend: 1 committed" in out and ": conserved" in out
    assert not folder.exists()


def test_wallet_commands_ops_endpoints_and_a_clean_stop(devnet_root: Path) -> None:
    d = str(devnet_root / "net")
    code, out = cli("devnet", "up", "--dir", d, "--signers", "0", "--workers", "2")
    assert code == 0 and "gateway:" in out
    net = devnet.Devnet.load(Path(d))
    alice, bob = str(devnet_root / "alice.json"), str(devnet_root / "bob.json")
    code, out = cli("wallet", "create", "--file", alice, "--gateway", net.gateway_url)
    assert code == 0
    words = out.splitlines()[1].strip()
    assert len(words.split()) == 12
    assert cli("wallet", "create", "--file", alice, "--gateway", net.gateway_url)[0] == 2
    _, a_addr = cli("wallet", "address", "--file", alice)
    code, out = cli(
        "wallet", "restore", *words.split(), "--file", bob, "--gateway", net.gateway_url
    )
    assert code == 0
    assert cli("wallet", "address", "--file", bob)[1] == a_addr  # the same words, same keys
    Path(bob).unlink()  # Bob gets words of his own
    cli("wallet", "create", "--file", bob, "--gateway", net.gateway_url)
    _, b_addr = cli("wallet", "address", "--file", bob)
    code, out = cli("devnet", "fund", a_addr.strip(), "5000000", "--dir", d)
    assert code == 0 and "issued 5000000 msat" in out
    assert _balance_is(alice, 5_000_000)
    code, out = cli("wallet", "pay", b_addr.strip(), "1200000", "--file", alice)
    assert code == 0 and "committed in worker" in out, out
    assert _balance_is(bob, 1_200_000)
    assert _balance_is(alice, 5_000_000 - 1_200_000 - 1_000)
    code, out = cli("wallet", "pay", b_addr.strip(), "99000000", "--file", alice)
    assert code == 1  # insufficient funds, refused before anything is sent
    _, history = cli("wallet", "history", "--file", alice)
    # one line a transaction: the funding, then the payment with its fee, less the change
    lines = history.splitlines()
    assert len(lines) == 2, history
    assert lines[0].split()[1:4] == ["-1201000", "msat", "sent"], history
    assert lines[1].split()[1:4] == ["+5000000", "msat", "received"], history
    _a_restored_wallet_finds_every_key_in_use(devnet_root, d, net, words, alice, bob, b_addr)
    # Every process answers its ops endpoints.
    ports = [net.gateway_port, net.indexer_port, *(w.http_port for w in net.workers)]
    for port in ports:
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        status, body = get(f"http://127.0.0.1:{port}/readyz")
        assert status == 200 and json.loads(body)["ready"]
    _, metrics = get(f"http://127.0.0.1:{net.workers[0].http_port}/metrics")
    for name in (
        "worker_committed_txs",
        "worker_confirm_seconds",
        "worker_package_items",
        "worker_block_records",
        "worker_fsync_seconds",
        "worker_queue_depth",
    ):
        assert name in metrics
    _, metrics = get(f"http://127.0.0.1:{net.gateway_port}/metrics")
    assert 'gateway_txs_total{code="committed"}' in metrics
    assert "gateway_confirm_seconds" in metrics and "gateway_queue_depth" in metrics
    # SIGTERM: every service drains and says so.
    assert cli("devnet", "down", "--dir", d)[0] == 0
    logs = [Path(w.state_dir) / "worker.log" for w in net.workers]
    logs += [Path(d) / "gateway.log", Path(d) / "indexer.log"]
    for log in logs:
        assert '"event": "stopped"' in log.read_text(), log


def _a_restored_wallet_finds_every_key_in_use(
    root: Path, d: str, net: devnet.Devnet, words: str, alice: str, bob: str, b_addr: str
) -> None:
    """Alice's coins sit at a change key and, once funded there, at a receive key past
    the few a balance looks ahead: restored from her words, the wallet finds both."""
    for _ in range(7):
        _, late = cli("wallet", "address", "--file", alice)
    assert cli("devnet", "fund", late.strip(), "700000", "--dir", d)[0] == 0
    held = 5_000_000 - 1_200_000 - 1_000 + 700_000
    assert _balance_is(alice, held)
    restored = str(root / "alice-restored.json")
    code, out = cli(
        "wallet", "restore", *words.split(), "--file", restored, "--gateway", net.gateway_url
    )
    assert code == 0 and "keys in use: 8 to receive, 1 for change" in out, out
    assert _balance_is(restored, held)
    code, out = cli("wallet", "pay", b_addr.strip(), "4000000", "--file", restored)
    assert code == 0 and "committed in worker" in out, out  # the change and the late coin
    assert _balance_is(bob, 5_200_000)
    assert cli("wallet", "rescan", "--file", alice)[1].strip() == (
        "keys in use: 8 to receive, 2 for change"  # the restored wallet's payment, seen
    )


def _balance_is(wallet: str, expected: int) -> bool:
    """Whether the wallet shows ``expected`` within 5 s (the index follows the blocks)."""
    for _ in range(50):
        code, out = cli("wallet", "balance", "--file", wallet)
        assert code == 0, out
        if int(out.split()[0]) == expected:
            return True
        time.sleep(0.1)
    return False
