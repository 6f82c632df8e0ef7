"""The signer's disk: its identity key and share sealed at rest, and its audit log.

Secrets are sealed with ChaCha20-Poly1305 under the storage key from the environment;
the associated data names the file's role, so a sealed share cannot be swapped in for
an identity key. Files are replaced atomically (write, fsync, rename, fsync the folder).

The audit log is append-only JSON lines, one per partial signature, each carrying the
hash of the line before it; an entry is on disk (fsync) before its partial signature
leaves the process. On start the chain is checked and the signing policy is rebuilt
from it, so a restart never forgets which checkpoints it signed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from constellation.crypto import dkg
from constellation.errors import DKGError
from constellation.guild import SignTarget
from constellation.protocol.signer import decode_target
from services.runtime import ConfigError, sync_dir, write_atomic

log = logging.getLogger("signer.store")

MAGIC = b"CSTSEAL1"


def seal(key: bytes, role: str, plaintext: bytes) -> bytes:
    nonce = os.urandom(12)
    return MAGIC + nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, MAGIC + role.encode())


def unseal(key: bytes, role: str, data: bytes) -> bytes:
    if data[: len(MAGIC)] != MAGIC or len(data) < len(MAGIC) + 12 + 16:
        raise ConfigError(f"the sealed {role} file is not in a format this signer reads")
    nonce = data[len(MAGIC) : len(MAGIC) + 12]
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, data[len(MAGIC) + 12 :], MAGIC + role.encode())
    except InvalidTag:
        raise ConfigError(
            f"cannot open the sealed {role}: wrong SIGNER_STORAGE_KEY or a damaged file"
        ) from None


class ShareRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """This participant's part of the guild key, as ChillDKG left it."""

    guild: str
    t: int
    hostpubkeys: list[bytes]
    threshold_pubkey: bytes
    pubshares: list[bytes]
    secshare: bytes
    recovery_data: bytes


def share_record(guild: str, hostseckey: bytes, recovery_data: bytes) -> ShareRecord:
    """This host's share of the key a DKG made, from the DKG's recovery data."""
    try:
        output, params = dkg.recover(hostseckey, recovery_data)
    except DKGError as exc:
        raise ConfigError(f"recovery data: {exc}") from None
    assert output.secshare is not None
    return ShareRecord(
        guild,
        params.t,
        list(params.hostpubkeys),
        output.threshold_pubkey,
        list(output.pubshares),
        output.secshare,
        recovery_data,
    )


class KeyAgreement(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The new guild key this signer's operator agreed it takes part in: among these
    members (their host public keys, in member order), ``t`` of them signing."""

    hostpubkeys: list[bytes]
    t: int


class KeyStore:
    """``identity.sealed`` (the host secret key) and the shares of the guild's keys in
    ``state_dir``: ``share.sealed`` (the first key), then ``share-1.sealed``,
    ``share-2.sealed``, ... (each key a change of members made); ``active-key`` names
    the one that signs (the first where absent); ``agreed-key.json`` the next key's
    members, once this operator agreed to them.

    ``recovery.bin`` (``recovery-1.bin``, ...) holds ChillDKG's recovery data in the
    clear: it has no secret, and with the host key it restores a share if its sealed
    file is lost (``restore_shares``). It is the same at every participant of a DKG: an
    operator that lost it too copies another member's.
    """

    def __init__(self, state_dir: Path, storage_key: bytes) -> None:
        self.dir = state_dir
        self.key = storage_key

    @property
    def identity_path(self) -> Path:
        return self.dir / "identity.sealed"

    def create_identity(self) -> bytes:
        """Make a fresh host key (refuses to replace one); returns its public key."""
        if self.identity_path.exists():
            raise ConfigError(f"{self.identity_path} exists: refusing to replace an identity")
        self.dir.mkdir(parents=True, exist_ok=True)
        hostseckey = os.urandom(32)
        write_atomic(self.identity_path, seal(self.key, "identity", hostseckey))
        return dkg.hostpubkey_gen(hostseckey)

    def load_identity(self) -> bytes:
        try:
            data = self.identity_path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"no identity at {self.identity_path}: create one first") from None
        hostseckey = unseal(self.key, "identity", data)
        if len(hostseckey) != 32:
            raise ConfigError("the sealed identity is not a 32-byte key")
        return hostseckey

    def _share_path(self, k: int) -> Path:
        return self.dir / ("share.sealed" if k == 0 else f"share-{k}.sealed")

    def _recovery_path(self, k: int) -> Path:
        return self.dir / ("recovery.bin" if k == 0 else f"recovery-{k}.bin")

    def save_share(self, record: ShareRecord) -> None:
        """Keep the share of a new key beside the ones held (never replacing one)."""
        k = len(self.load_shares())
        write_atomic(self._recovery_path(k), record.recovery_data)
        self._seal_share(k, record)

    def _seal_share(self, k: int, record: ShareRecord) -> None:
        write_atomic(self._share_path(k), seal(self.key, "share", msgspec.msgpack.encode(record)))

    def restore_shares(self, hostseckey: bytes, guild: str) -> list[bytes]:
        """Rebuild each share whose sealed file is lost from its recovery data, in key
        order (ChillDKG's recovery: with this host key, the data gives the share back);
        the keys restored. Raises ConfigError where the data is not a DKG this host key
        took part in."""
        restored = []
        for k in itertools.count():
            if not self._share_path(k).exists():
                if not self._recovery_path(k).exists():
                    break
                record = share_record(guild, hostseckey, self._recovery_path(k).read_bytes())
                self._seal_share(k, record)
                restored.append(record.threshold_pubkey)
        return restored

    def load_shares(self) -> list[ShareRecord]:
        """The shares held, the oldest key first."""
        shares: list[ShareRecord] = []
        while True:
            try:
                data = self._share_path(len(shares)).read_bytes()
            except FileNotFoundError:
                return shares
            plain = unseal(self.key, "share", data)
            shares.append(msgspec.msgpack.decode(plain, type=ShareRecord))

    def save_active(self, threshold_pubkey: bytes) -> None:
        write_atomic(self.dir / "active-key", threshold_pubkey.hex().encode())

    def load_active(self) -> bytes | None:
        try:
            return bytes.fromhex((self.dir / "active-key").read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            raise ConfigError(f"{self.dir / 'active-key'} is not a key in hex") from None

    def save_agreement(self, agreement: KeyAgreement | None) -> None:
        path = self.dir / "agreed-key.json"
        if agreement is None:
            path.unlink(missing_ok=True)
            sync_dir(self.dir)
        else:
            write_atomic(path, msgspec.json.encode(agreement))

    def load_agreement(self) -> KeyAgreement | None:
        try:
            data = (self.dir / "agreed-key.json").read_bytes()
        except FileNotFoundError:
            return None
        try:
            return msgspec.json.decode(data, type=KeyAgreement)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ConfigError(f"{self.dir / 'agreed-key.json'}: {exc}") from None


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at_ms: int
    request_id: str
    coordinator: int
    purpose: str
    target: str  # msgpack of the SignTarget, hex
    msg: str
    session_id: int
    ids: list[int]
    psig: str
    epoch: int = 0  # a checkpoint's epoch at its height
    cert: str = ""  # above epoch 0: msgpack of the standings that let it in, hex


def target_of(entry: dict[str, Any]) -> SignTarget:
    return decode_target(bytes.fromhex(entry["target"]))


class AuditLog:
    """Append-only, hash-chained log of every partial signature this signer made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._loaded: list[dict[str, Any]] = []  # what was on disk at start
        self.count = 0
        self._prev = bytes(32).hex()
        self._load()
        self._file = open(path, "ab")  # noqa: SIM115 - held open for the process lifetime

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        complete, newline, tail = data.rpartition(b"\n")
        if tail:  # no newline after it: the write was cut short, so it was never sent
            keep = len(complete) + len(newline)
            log.warning(
                "audit log: cutting a torn last line",
                extra={"path": str(self.path), "offset": keep},
            )
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
        for n, line in enumerate(complete.split(b"\n") if complete else []):
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not isinstance(entry, dict) or entry.get("prev") != self._prev:
                raise ConfigError(f"audit log {self.path} is broken at line {n + 1}")
            self._loaded.append(entry)
            self.count += 1
            self._prev = hashlib.sha256(line).hexdigest()

    def take_loaded(self) -> list[dict[str, Any]]:
        """The entries found on disk at start, handed out once (to rebuild the policy)."""
        loaded, self._loaded = self._loaded, []
        return loaded

    def append(self, entry: AuditEntry) -> None:
        record = {**entry.__dict__, "prev": self._prev}
        line = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
        self._file.write(line + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._prev = hashlib.sha256(line).hexdigest()
        self.count += 1

    def close(self) -> None:
        self._file.close()
