"""The reference Cashu wallet, nutshell's ``cashu`` 0.20.2 unchanged (installed by
``scripts/setup`` in ``.venv-cashu``), against an operator's mint on a local guild:
mint for an invoice paid from another node (once waiting on the mint's websocket,
NUT-17), send and receive a token (a swap) and one locked to a key (NUT-11),
pay an invoice (a melt, with its fee reserve's change), check the proofs' state, and
restore the wallet from its seed words."""

from __future__ import annotations

import os
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyln.client import LightningRpc

from services.devnet import Devnet, guild
from tests.system.guild import local_guild

CASHU = Path(__file__).parents[2] / ".venv-cashu" / "bin" / "cashu"


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    with local_guild("cst-cashu-", operators=2) as directory:
        yield directory


def cashu_env(home: Path) -> dict[str, str]:
    return {**os.environ, "CASHU_DIR": str(home), "TOR": "FALSE", "DEBUG": "FALSE"}


def cashu(net: Devnet, home: Path, *args: str, stdin: str = "", ok: bool = True) -> str:
    """``cashu`` as a user runs it, against ``net``'s mint, with its data in ``home``;
    what it printed (``ok``: it must succeed, else fail)."""
    done = subprocess.run(
        [str(CASHU), "--host", net.mint_url, "-y", *args],
        env=cashu_env(home),
        cwd=home,  # no stray .env: nutshell reads ./.env before the environment
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = done.stdout + done.stderr
    assert (done.returncode == 0) == ok, out
    return out


def balance(net: Devnet, home: Path) -> int:
    found = re.findall(r"Balance: (\d+) sat", cashu(net, home, "balance"))
    return int(found[-1])


def mint_waiting_on_the_websocket(net: Devnet, home: Path, payer: LightningRpc, sat: int) -> None:
    """``cashu invoice SAT`` as a user runs it: it shows the invoice, then waits to be
    told over the mint's websocket (NUT-17) that it is paid, and mints."""
    waiting = subprocess.Popen(
        [str(CASHU), "--host", net.mint_url, "-y", "invoice", str(sat)],
        env={**cashu_env(home), "PYTHONUNBUFFERED": "1"},
        cwd=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert waiting.stdout is not None
        lines: list[str] = []
        while not (found := re.search(r"Invoice: (lnbcrt\S+)", "".join(lines))):
            line = waiting.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        assert payer.pay(found.group(1))["status"] == "complete"
        out, _ = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    assert waiting.returncode == 0 and "Invoice paid" in out, "".join(lines) + out
    with urllib.request.urlopen(f"{net.mint_url}/metrics") as r:
        told = re.search(r"^mint_ws_notifications_total (\S+)", r.read().decode(), re.M)
    assert told and float(told.group(1)) >= 1  # told by the websocket, not by polling


def test_the_reference_wallet_mints_sends_pays_and_restores(where: Path, tmp_path: Path) -> None:
    op0, op1 = guild.load(where)
    other = LightningRpc(op1.lightning_rpc)
    alice, bob, carol, again = (tmp_path / n for n in ("alice", "bob", "carol", "restored"))
    for home in (alice, bob, carol, again):
        home.mkdir()
    info = cashu(op0, alice, "info", "--mint")
    assert "Constellation mint of op0" in info and "NUT-12" in info
    # mint: the quote's invoice paid from op1's node
    out = cashu(op0, alice, "invoice", "500", "-n")
    invoice = re.search(r"Invoice: (lnbcrt\S+)", out)
    quote = re.search(r"--id (\S+)", out)
    assert invoice and quote, out
    assert other.pay(invoice.group(1))["status"] == "complete"
    assert "Invoice paid" in cashu(op0, alice, "invoice", "500", "--id", quote.group(1))
    assert balance(op0, alice) == 500
    # and the usual way: the wallet waits on the mint's websocket (NUT-17) for the payment
    mint_waiting_on_the_websocket(op0, alice, other, 50)
    assert balance(op0, alice) == 550
    # send a token (swapped, with DLEQ proofs) and receive it at bob's wallet
    sent = cashu(op0, alice, "send", "120", "--dleq", "--force-swap")
    token = re.search(r"cashuB[A-Za-z0-9_=-]+", sent)
    assert token is not None
    assert "Received 120 sat" in cashu(op0, bob, "receive", token.group(0))
    assert balance(op0, bob) == 120 and balance(op0, alice) == 430
    # the token is spent: receiving it again is refused with the NUT code
    assert "11001" in cashu(op0, bob, "receive", token.group(0), ok=False)
    # a token locked to bob's key (NUT-11): carol cannot receive it, bob can
    lock = re.search(r"Public receiving lock: (P2PK:\S+)", cashu(op0, bob, "lock", "p2pk"))
    assert lock is not None
    sent = cashu(op0, alice, "send", "40", "--lock", lock.group(1))
    token = re.search(r"cashuB[A-Za-z0-9_=-]+", sent)
    assert token is not None
    cashu(op0, carol, "receive", token.group(0), ok=False)
    assert "Received 40 sat" in cashu(op0, bob, "receive", token.group(0))
    assert balance(op0, bob) == 160 and balance(op0, alice) == 390
    # pay (melt) an invoice of op1's node: 100 sat, the fee reserve's rest back as change
    bolt11 = other.invoice(100_000, f"cashu-{os.urandom(4).hex()}", "a melt")["bolt11"]
    assert "Invoice paid" in cashu(op0, alice, "pay", bolt11, "-y")
    paid = [i for i in other.listinvoices()["invoices"] if i["bolt11"] == bolt11]
    assert paid[0]["status"] == "paid"
    assert balance(op0, alice) == 290  # a simulated channel charges no routing fee
    cashu(op0, alice, "burn", "-a")  # checks every proof's state: none is spent
    assert balance(op0, alice) == 290
    # restore alice's wallet from its words: the mint gives back her 290 sat of proofs
    words = re.search(r"Mnemonic:\s*\n\s*-\s*(.+)", cashu(op0, alice, "info", "--mnemonic"))
    assert words is not None
    cashu(op0, again, "restore", "--batch", "25", "--to", "2", stdin=words.group(1) + "\n")
    assert balance(op0, again) == 290
