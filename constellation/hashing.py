"""BIP340-style tagged hashes: ``sha256(sha256(tag) || sha256(tag) || msg)``."""

from __future__ import annotations

import hashlib
from typing import Protocol


class TaggedHasher(Protocol):
    """Hashes a message under one tag; ``midstate`` has absorbed the tag prefix."""

    midstate: hashlib._Hash

    def __call__(self, msg: bytes, /) -> bytes: ...


def tagged_hasher(tag: str) -> TaggedHasher:
    """Return a function hashing a message under ``tag``, with the tag's prefix pre-absorbed.

    Hashing the 64-byte tag prefix once and copying the midstate makes each call cost
    only the message: this runs several times per transaction on the hot path.
    """
    tag_digest = hashlib.sha256(tag.encode()).digest()
    midstate = hashlib.sha256(tag_digest + tag_digest)

    def tagged(msg: bytes) -> bytes:
        h = midstate.copy()
        h.update(msg)
        return h.digest()

    tagged.midstate = midstate  # type: ignore[attr-defined]
    return tagged  # type: ignore[return-value]


def tagged_hash(tag: str, msg: bytes) -> bytes:
    """One-off tagged hash; prefer ``tagged_hasher`` for tags used repeatedly."""
    return tagged_hasher(tag)(msg)
