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
from constellation.guild import SignTarget
from constellation.protocol.signer import decode_target
from services.runtime import ConfigError, write_atomic

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


class KeyStore:
    """``identity.sealed`` (the host secret key) and ``share.sealed`` in ``state_dir``.

    ``recovery.bin`` holds ChillDKG's recovery data in the clear: it has no secret, and
    with the host key it restores the share if ``share.sealed`` is lost.
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

    def save_share(self, record: ShareRecord) -> None:
        path = self.dir / "share.sealed"
        if path.exists():
            raise ConfigError(f"{path} exists: refusing to replace a key share")
        write_atomic(self.dir / "recovery.bin", record.recovery_data)
        write_atomic(path, seal(self.key, "share", msgspec.msgpack.encode(record)))

    def load_share(self) -> ShareRecord | None:
        try:
            data = (self.dir / "share.sealed").read_bytes()
        except FileNotFoundError:
            return None
        plain = unseal(self.key, "share", data)
        return msgspec.msgpack.decode(plain, type=ShareRecord)


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
