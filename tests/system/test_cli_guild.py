"""`constellation devnet up`, `guild keygen`, `guild sign`, `devnet down`, as a user runs them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from coincurve import PublicKeyXOnly

from services import devnet
from services.cli import main


def test_devnet_keygen_and_sign(devnet_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = str(devnet_root / "net")
    assert main(["devnet", "up", "--dir", folder, "--signers", "3"]) == 0
    try:
        assert re.search(r"signer 2: +pid", capsys.readouterr().out)
        assert main(["devnet", "up", "--dir", folder]) == 2  # running already: refused
        assert "is running" in capsys.readouterr().err
        assert main(["guild", "keygen", "--dir", folder]) == 0
        out = capsys.readouterr().out
        assert "threshold: 2 of 3" in out
        key = re.search(r"guild key \(x-only\): ([0-9a-f]{64})", out)
        assert key is not None
        assert (
            main(["guild", "sign", "pay the guild's bills", "--dir", folder, "--operator", "1"])
            == 0
        )
        out = capsys.readouterr().out
        assert "BIP340 verification (coincurve): valid" in out
        sig = re.search(r"signature: +([0-9a-f]{128})", out)
        assert sig is not None
        xonly = PublicKeyXOnly(bytes.fromhex(key.group(1)))
        assert xonly.verify(bytes.fromhex(sig.group(1)), b"pay the guild's bills")
        assert main(["guild", "sign", "x" * 32, "--dir", folder]) == 1
        assert "digest" in capsys.readouterr().err
    finally:
        assert main(["devnet", "down", "--dir", folder]) == 0
    pids = [p.pid for p in devnet.Devnet.load(Path(folder)).signers]
    assert not any(devnet.alive(pid) for pid in pids)
    assert main(["devnet", "up", "--dir", folder]) == 0  # state kept: same guild key
    try:
        assert main(["guild", "sign", "again", "--dir", folder]) == 0
        assert key.group(1) in capsys.readouterr().out
    finally:
        assert main(["devnet", "down", "--dir", folder, "--purge"]) == 0
    assert not Path(folder).exists()
    assert main(["guild", "sign", "no devnet", "--dir", folder]) == 2
