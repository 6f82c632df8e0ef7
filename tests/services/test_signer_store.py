"""The signer's disk: sealed secrets and the hash-chained audit log."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from constellation.crypto.dkg import hostpubkey_gen
from constellation.guild import Checkpoint, Statement
from constellation.protocol.signer import encode_target
from services.runtime import ConfigError
from services.signer.store import (
    AuditEntry,
    AuditLog,
    KeyAgreement,
    KeyStore,
    ShareRecord,
    share_record,
    target_of,
)
from tests.crypto.test_dkg import run_dkg

KEY = bytes(range(32))


def record(key: bytes = b"\x03" * 33, recovery: bytes = b"rd") -> ShareRecord:
    return ShareRecord("g", 2, [b"\x02" * 33] * 3, key, [b"\x02" * 33] * 3, b"s" * 32, recovery)


def test_identity_and_share_round_trip_sealed(tmp_path: Path) -> None:
    store = KeyStore(tmp_path, KEY)
    pub = store.create_identity()
    assert hostpubkey_gen(store.load_identity()) == pub
    assert store.load_shares() == []
    store.save_share(record())
    assert store.load_shares() == [record()]
    on_disk = (tmp_path / "share.sealed").read_bytes() + store.identity_path.read_bytes()
    assert b"s" * 32 not in on_disk and store.load_identity() not in on_disk
    assert (tmp_path / "recovery.bin").read_bytes() == b"rd"


def test_secrets_are_never_replaced(tmp_path: Path) -> None:
    """An identity is made once; a new key's share goes beside the ones held."""
    store = KeyStore(tmp_path, KEY)
    store.create_identity()
    with pytest.raises(ConfigError, match="refusing to replace an identity"):
        store.create_identity()
    store.save_share(record())
    store.save_share(record(b"\x02" * 33, b"rd1"))
    assert store.load_shares() == [record(), record(b"\x02" * 33, b"rd1")]
    assert (tmp_path / "recovery-1.bin").read_bytes() == b"rd1"
    assert (tmp_path / "recovery.bin").read_bytes() == b"rd"


def test_the_active_key_and_the_agreed_one_are_kept(tmp_path: Path) -> None:
    store = KeyStore(tmp_path, KEY)
    assert store.load_active() is None and store.load_agreement() is None
    store.save_active(b"\x02" * 33)
    agreed = KeyAgreement([b"\x02" * 33, b"\x03" * 33], 2)
    store.save_agreement(agreed)
    again = KeyStore(tmp_path, KEY)
    assert again.load_active() == b"\x02" * 33 and again.load_agreement() == agreed
    again.save_agreement(None)
    assert store.load_agreement() is None
    (tmp_path / "agreed-key.json").write_text('{"hostpubkeys": [], "t": 2, "x": 1}')
    with pytest.raises(ConfigError, match="agreed-key"):
        store.load_agreement()


def test_wrong_key_swapped_file_or_damage_is_refused(tmp_path: Path) -> None:
    store = KeyStore(tmp_path, KEY)
    store.create_identity()
    store.save_share(record())
    with pytest.raises(ConfigError, match="wrong SIGNER_STORAGE_KEY"):
        KeyStore(tmp_path, os.urandom(32)).load_identity()
    share = (tmp_path / "share.sealed").read_bytes()
    store.identity_path.write_bytes(share)  # a sealed share where the identity belongs
    with pytest.raises(ConfigError):
        store.load_identity()
    (tmp_path / "share.sealed").write_bytes(share[:-1] + bytes([share[-1] ^ 1]))
    with pytest.raises(ConfigError):
        store.load_shares()


def entry(seq: int, height: int) -> AuditEntry:
    target = (
        Checkpoint("g", height, bytes(32), 0, bytes(32), bytes(32))
        if height >= 0
        else Statement("hi")
    )
    return AuditEntry(
        seq, 1, f"{seq:032x}", 0, "checkpoint", encode_target(target).hex(), "", 0, [0, 1], ""
    )


def test_audit_log_chains_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    for i in range(3):
        log.append(entry(i, i - 1))
    log.close()
    again = AuditLog(path)
    assert again.count == 3
    assert [target_of(e) for e in again.take_loaded()][1] == Checkpoint(
        "g", 0, bytes(32), 0, bytes(32), bytes(32)
    )
    again.append(entry(3, 5))
    again.close()
    assert AuditLog(path).count == 4


def test_audit_log_cuts_a_torn_tail_and_refuses_tampering(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    for i in range(3):
        log.append(entry(i, i))
    log.close()
    whole = path.read_bytes()
    path.write_bytes(whole[:-1])  # even a whole entry without its newline was never sent
    assert AuditLog(path).count == 2
    path.write_bytes(whole[:-7])  # a crash in the middle of the last write
    assert AuditLog(path).count == 2
    assert "torn last line" in caplog.text
    assert path.read_bytes() == whole[: whole.rindex(b"\n", 0, len(whole) - 1) + 1]

    lines = whole.split(b"\n")
    doc = json.loads(lines[0])
    doc["psig"] = "00" * 32  # rewriting history breaks the chain at the next line
    lines[0] = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(ConfigError, match="broken at line 2"):
        AuditLog(path)


def test_a_lost_share_is_restored_from_the_recovery_data(tmp_path: Path) -> None:
    """ChillDKG's recovery data (kept in the clear, the same at every participant) and
    the host key give a share back: its own file, or another member's where that was
    lost too. Data of a DKG this host took no part in, or tampered, is refused."""
    rng = random.Random(7)
    seckeys, _, [recovery], _ = run_dkg(3, 2, rng)
    stores = [KeyStore(tmp_path / f"s{i}", KEY) for i in range(3)]
    kept = [share_record("g", seckeys[i], recovery) for i in range(3)]
    for store, rec in zip(stores, kept, strict=True):
        store.dir.mkdir()
        store.save_share(rec)
    assert stores[1].restore_shares(seckeys[1], "g") == []  # nothing lost
    (stores[1].dir / "share.sealed").unlink()
    assert stores[1].restore_shares(seckeys[1], "g") == [kept[1].threshold_pubkey]
    assert stores[1].load_shares() == [kept[1]]
    # a second key made since, and the whole first key's files lost: another member's
    # recovery data is copied in
    second = record(b"\x02" * 33, b"rd1")
    stores[2].save_share(second)
    (stores[2].dir / "share.sealed").unlink()
    (stores[2].dir / "recovery.bin").unlink()
    assert stores[2].restore_shares(seckeys[2], "g") == []  # nothing to restore from
    (stores[2].dir / "recovery.bin").write_bytes((stores[0].dir / "recovery.bin").read_bytes())
    assert stores[2].restore_shares(seckeys[2], "g") == [kept[2].threshold_pubkey]
    assert stores[2].load_shares() == [kept[2], second]
    assert kept[2].secshare != kept[1].secshare  # each its own share
    # not this host's DKG, or tampered
    (stores[0].dir / "share.sealed").unlink()
    with pytest.raises(ConfigError, match="took no part"):
        stores[0].restore_shares(os.urandom(32), "g")
    bad = bytearray(recovery)
    bad[-1] ^= 1
    (stores[0].dir / "recovery.bin").write_bytes(bytes(bad))
    with pytest.raises(ConfigError, match="certificate"):
        stores[0].restore_shares(seckeys[0], "g")
    assert not (stores[0].dir / "share.sealed").exists()
