"""What the guild key signs, and why: typed signing requests and each signer's policy.

A signer never signs bytes it is handed. A request names its purpose and carries what
the message is derived from; each signer derives the message itself, checks it against
its own rules (and its own history, so it never signs two conflicting checkpoints) and
only then contributes a partial signature.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

import msgspec

from constellation.codec import u32, u64
from constellation.crypto import frost
from constellation.errors import Equivocation, RequestRefused
from constellation.hashing import tagged_hasher

MAX_STATEMENT_BYTES = 1024
GUILD_ID_MAX_LEN = 64

_checkpoint_hash = tagged_hasher("Constellation/checkpoint")


class Purpose(StrEnum):
    STATEMENT = "statement"
    CHECKPOINT = "checkpoint"


class Statement(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="statement"):
    """A text the guild attests to, signed as its UTF-8 bytes.

    Exactly 32 bytes is refused: that is the length of a Bitcoin sighash, a checkpoint
    hash and most protocols' digests, so a statement can never stand in for one of them.
    """

    text: str


class Checkpoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="checkpoint"):
    """The guild's ledger state at a height, chained to the previous checkpoint.

    Light clients check one BIP340 signature under the guild key over ``message()``.
    """

    guild: str
    height: int
    prev_hash: bytes  # message() of the checkpoint at height - 1 (zeros at height 0)
    state_root: bytes

    def message(self) -> bytes:
        guild = self.guild.encode()
        return _checkpoint_hash(
            u32(len(guild)) + guild + u64(self.height) + self.prev_hash + self.state_root
        )


SignTarget = Statement | Checkpoint


class Derived(NamedTuple):
    """The exact FROST inputs a request stands for."""

    purpose: Purpose
    msg: bytes
    tweaks: tuple[bytes, ...]
    is_xonly: tuple[bool, ...]


def derive(target: SignTarget) -> Derived:
    """Check a request's form and derive the message it signs (raises RequestRefused)."""
    if isinstance(target, Statement):
        data = target.text.encode()
        if not 0 < len(data) <= MAX_STATEMENT_BYTES:
            raise RequestRefused(f"a statement is 1..{MAX_STATEMENT_BYTES} bytes of UTF-8")
        if len(data) == 32:
            raise RequestRefused("a 32-byte statement could pass for a digest: refused")
        return Derived(Purpose.STATEMENT, data, (), ())
    if not 0 < len(target.guild.encode()) <= GUILD_ID_MAX_LEN:
        raise RequestRefused("a checkpoint names its guild")
    if not 0 <= target.height < 2**64:
        raise RequestRefused("checkpoint height out of range")
    if len(target.prev_hash) != 32 or len(target.state_root) != 32:
        raise RequestRefused("checkpoint hashes are 32 bytes")
    if target.height == 0 and target.prev_hash != bytes(32):
        raise RequestRefused("the first checkpoint has no predecessor")
    return Derived(Purpose.CHECKPOINT, target.message(), (), ())


def signing_pubkey(thresh_pk: bytes, derived: Derived) -> bytes:
    """The x-only key the request's signature verifies under (the tweaked guild key)."""
    return frost.tweak_context(thresh_pk, derived.tweaks, derived.is_xonly).xonly_pk


class SigningPolicy:
    """One signer's rules, and the memory of what it signed that they depend on.

    ``allowed`` lists the purposes this operator signs for; a checkpoint must be for
    this guild, must not conflict with another checkpoint signed at its height, and must
    extend the checkpoint signed at the height below when there is one.
    """

    def __init__(self, guild: str, allowed: frozenset[Purpose]) -> None:
        self.guild = guild
        self.allowed = allowed
        self.checkpoints: dict[int, bytes] = {}  # height -> message signed

    def check(self, target: SignTarget) -> Derived:
        derived = derive(target)
        if derived.purpose not in self.allowed:
            raise RequestRefused(f"this signer does not sign {derived.purpose} requests")
        if isinstance(target, Checkpoint):
            if target.guild != self.guild:
                raise RequestRefused(f"checkpoint of guild {target.guild!r}, not ours")
            signed = self.checkpoints.get(target.height)
            if signed is not None and signed != derived.msg:
                raise Equivocation(
                    f"a different checkpoint at height {target.height} was signed already"
                )
            below = self.checkpoints.get(target.height - 1)
            if below is not None and below != target.prev_hash:
                raise Equivocation(
                    f"checkpoint {target.height} does not extend the one signed below it"
                )
        return derived

    def record(self, target: SignTarget) -> None:
        """Remember a request this signer contributed a partial signature to."""
        if isinstance(target, Checkpoint):
            self.checkpoints[target.height] = target.message()
