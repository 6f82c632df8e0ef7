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

from constellation.bitcoin import SpendInput, SpendOutput, p2tr_script, taproot_sighash
from constellation.codec import u32, u64
from constellation.crypto import frost
from constellation.errors import Equivocation, RequestRefused
from constellation.hashing import tagged_hasher

MAX_STATEMENT_BYTES = 1024
GUILD_ID_MAX_LEN = 64

_checkpoint_hash = tagged_hasher("Constellation/checkpoint")
_deposit_tweak = tagged_hasher("Constellation/deposit")


MAX_SPEND_INPUTS = 500
MAX_SPEND_OUTPUTS = 500
MAX_SCRIPT_BYTES = 10_000
MAX_SAT = 21_000_000 * 100_000_000


class Purpose(StrEnum):
    STATEMENT = "statement"
    CHECKPOINT = "checkpoint"
    SPEND = "spend"


class Statement(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="statement"):
    """A text the guild attests to, signed as its UTF-8 bytes.

    Exactly 32 bytes is refused: that is the length of a Bitcoin sighash, a checkpoint
    hash and most protocols' digests, so a statement can never stand in for one of them.
    """

    text: str


class Checkpoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="checkpoint"):
    """The guild's ledger at a height, chained to the previous checkpoint: ``shards`` is
    the Merkle root over every shard's entry (``constellation.lightclient.proof``), and
    ``members`` commits to the member set that made it.

    Light clients check one BIP340 signature under the guild key over ``message()``.

    A **handover** names ``next_key`` (x-only) and ``next_members``: signed by the key
    that signs it, it says that from the next height on the checkpoints are signed by
    ``next_key`` and name ``next_members``, after a change of the guild's members made a
    new key. A light client follows the chain of handovers from the key it pinned.
    """

    guild: str
    height: int
    prev_hash: bytes  # message() of the checkpoint at height - 1 (zeros at height 0)
    time_ms: int  # the proposer's clock, for a reader to see how old it is
    shards: bytes
    members: bytes
    next_key: bytes = b""  # a handover's: the key that signs from the next height on
    next_members: bytes = b""  # and the member set that holds it

    def message(self) -> bytes:
        guild = self.guild.encode()
        return _checkpoint_hash(
            u32(len(guild))
            + guild
            + u64(self.height)
            + self.prev_hash
            + u64(self.time_ms)
            + self.shards
            + self.members
            + self.next_key  # both empty or both 32 bytes: the length says which
            + self.next_members
        )


class OnchainSpend(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="spend"):
    """A Bitcoin transaction spending guild funds; the guild signs input ``input_index``.

    Each signer recomputes the BIP341 signature hash from the transaction and the outputs
    it spends, and signs only if that input is a taproot output of the guild's
    (``guild_output``: the guild key, moved by ``derivation`` where there is one, with
    the BIP341 key-path tweak) and no value is created.
    """

    version: int
    locktime: int
    inputs: list[SpendInput]
    outputs: list[SpendOutput]
    input_index: int
    derivation: bytes = b""  # the signed input's: empty, or 32 bytes


class GuildOutput(NamedTuple):
    """A key of the guild's on-chain funds, and the FROST tweaks that sign for it."""

    xonly: bytes  # the taproot output key
    tweaks: tuple[bytes, ...]
    is_xonly: tuple[bool, ...]


def guild_output(thresh_pk: bytes, derivation: bytes = b"") -> GuildOutput:
    """The taproot output key of the guild key ``thresh_pk`` (33 bytes) for a
    ``derivation`` (empty, or 32 bytes naming one deposit address).

    A derivation adds ``hash_Constellation/deposit(thresh_pk || derivation)`` times G to
    the guild key (a plain tweak, as BIP32's unhardened derivation), so every deposit has
    an address of its own that only the guild signs for, and that anyone holding the
    guild key and the derivation can check; the BIP341 key-path tweak (no script tree)
    comes last. The tweaks are hashes, never scalars a requester picks.
    """
    tweaks: list[bytes] = []
    if derivation:
        if len(derivation) != 32:
            raise RequestRefused("a derivation is 32 bytes")
        tweaks.append(_deposit_tweak(thresh_pk + derivation))
    internal = frost.tweak_context(thresh_pk, tweaks, [False] * len(tweaks)).xonly_pk
    tweaks.append(frost.taproot_tweak(internal))
    is_xonly = (*([False] * (len(tweaks) - 1)), True)
    output = frost.tweak_context(thresh_pk, tweaks, is_xonly).xonly_pk
    return GuildOutput(output, tuple(tweaks), is_xonly)


SignTarget = Statement | Checkpoint | OnchainSpend


class Derived(NamedTuple):
    """The exact FROST inputs a request stands for, and the key its signature verifies
    under (x-only: the guild key, tweaked for a spend)."""

    purpose: Purpose
    msg: bytes
    tweaks: tuple[bytes, ...]
    is_xonly: tuple[bool, ...]
    pubkey: bytes


def _u32(value: int) -> bool:
    return 0 <= value < 2**32


def _derive_spend(spend: OnchainSpend, thresh_pk: bytes) -> Derived:
    if not 1 <= len(spend.inputs) <= MAX_SPEND_INPUTS:
        raise RequestRefused(f"a spend has 1..{MAX_SPEND_INPUTS} inputs")
    if not 1 <= len(spend.outputs) <= MAX_SPEND_OUTPUTS:
        raise RequestRefused(f"a spend has 1..{MAX_SPEND_OUTPUTS} outputs")
    if not (_u32(spend.version) and _u32(spend.locktime)):
        raise RequestRefused("version and locktime are 32-bit")
    if not 0 <= spend.input_index < len(spend.inputs):
        raise RequestRefused("input_index names no input")
    for i in spend.inputs:
        if len(i.txid) != 32 or not (_u32(i.vout) and _u32(i.sequence)):
            raise RequestRefused("an input's outpoint or sequence is malformed")
    if len({(i.txid, i.vout) for i in spend.inputs}) != len(spend.inputs):
        raise RequestRefused("an outpoint is spent twice")
    coins: list[SpendInput | SpendOutput] = [*spend.inputs, *spend.outputs]
    for coin in coins:
        if not 0 <= coin.amount_sat <= MAX_SAT or len(coin.script_pubkey) > MAX_SCRIPT_BYTES:
            raise RequestRefused("an amount or a script is out of range")
    if sum(o.amount_sat for o in spend.outputs) > sum(i.amount_sat for i in spend.inputs):
        raise RequestRefused("the outputs are worth more than the inputs")
    output = guild_output(thresh_pk, spend.derivation)
    if spend.inputs[spend.input_index].script_pubkey != p2tr_script(output.xonly):
        raise RequestRefused("the input to sign is not the guild's taproot output")
    msg = taproot_sighash(
        spend.version, spend.locktime, spend.inputs, spend.outputs, spend.input_index
    )
    return Derived(Purpose.SPEND, msg, output.tweaks, output.is_xonly, output.xonly)


def derive(target: SignTarget, thresh_pk: bytes) -> Derived:
    """Check a request's form and derive the message it signs (raises RequestRefused).

    ``thresh_pk`` is the guild key (33 bytes): a spend must spend the guild's output."""
    if isinstance(target, OnchainSpend):
        return _derive_spend(target, thresh_pk)
    if isinstance(target, Statement):
        data = target.text.encode()
        if not 0 < len(data) <= MAX_STATEMENT_BYTES:
            raise RequestRefused(f"a statement is 1..{MAX_STATEMENT_BYTES} bytes of UTF-8")
        if len(data) == 32:
            raise RequestRefused("a 32-byte statement could pass for a digest: refused")
        return Derived(Purpose.STATEMENT, data, (), (), thresh_pk[1:])
    if not 0 < len(target.guild.encode()) <= GUILD_ID_MAX_LEN:
        raise RequestRefused("a checkpoint names its guild")
    if not 0 <= target.height < 2**64:
        raise RequestRefused("checkpoint height out of range")
    if not 0 <= target.time_ms < 2**64:
        raise RequestRefused("checkpoint time out of range")
    if any(len(h) != 32 for h in (target.prev_hash, target.shards, target.members)):
        raise RequestRefused("checkpoint hashes are 32 bytes")
    if target.height == 0 and target.prev_hash != bytes(32):
        raise RequestRefused("the first checkpoint has no predecessor")
    if (len(target.next_key), len(target.next_members)) not in ((0, 0), (32, 32)):
        raise RequestRefused("a handover names a 32-byte key and member set, or neither")
    if target.next_key == thresh_pk[1:]:
        raise RequestRefused("a handover names another key than the one that signs it")
    return Derived(Purpose.CHECKPOINT, target.message(), (), (), thresh_pk[1:])


class SigningPolicy:
    """One signer's rules, and the memory of what it signed that they depend on.

    ``allowed`` lists the purposes this operator signs for; a checkpoint must be for
    this guild, must not conflict with another checkpoint signed at its height, must
    extend the checkpoint signed at the height below when there is one, and above a
    handover this signer signed or learned of must be signed by the key handed over to.
    """

    def __init__(self, guild: str, allowed: frozenset[Purpose]) -> None:
        self.guild = guild
        self.allowed = allowed
        self.checkpoints: dict[int, bytes] = {}  # height -> message signed
        self.handovers: dict[int, bytes] = {}  # height -> the key that signs above it

    def check(self, target: SignTarget, thresh_pk: bytes) -> Derived:
        """Derive the request's message and apply every rule (raises RequestRefused)."""
        derived = derive(target, thresh_pk)
        if derived.purpose not in self.allowed:
            raise RequestRefused(f"this signer does not sign {derived.purpose} requests")
        if isinstance(target, Checkpoint) and target.guild != self.guild:
            raise RequestRefused(f"checkpoint of guild {target.guild!r}, not ours")
        if isinstance(target, Checkpoint):
            below = [h for h in self.handovers if h < target.height]
            if below and self.handovers[max(below)] != thresh_pk[1:]:
                raise Equivocation(
                    f"checkpoint {target.height} is not signed by the key that signs"
                    f" above height {max(below)}"
                )
        self.check_history(target, derived.msg)
        return derived

    def check_history(self, target: SignTarget, msg: bytes) -> None:
        """The rules that depend on what was signed since: checked again just before
        signing, as a concurrent request may have signed a conflicting checkpoint."""
        if not isinstance(target, Checkpoint):
            return
        signed = self.checkpoints.get(target.height)
        if signed is not None and signed != msg:
            raise Equivocation(
                f"a different checkpoint at height {target.height} was signed already"
            )
        below = self.checkpoints.get(target.height - 1)
        if below is not None and below != target.prev_hash:
            raise Equivocation(
                f"checkpoint {target.height} does not extend the one signed below it"
            )

    def learn(self, signed: Checkpoint, key: bytes) -> None:
        """The guild signed ``signed`` with ``key`` (x-only; the signature checked by
        the caller): a share this signer released for another checkpoint at its height
        lost, the next height extends this one, and ``key`` signs from its height on
        (until a handover). A handover this signer holds below it that names another key
        lost (after a restart the audit log gives back every share released, lost or
        not); where it holds none naming ``key``, it holds that ``key`` signs above the
        height below (a handover it missed)."""
        height = signed.height
        self.checkpoints[height] = signed.message()
        for below in sorted((h for h in self.handovers if h < height), reverse=True):
            if self.handovers[below] == key:
                break
            del self.handovers[below]
        else:
            self.handovers[height - 1] = key
        if signed.next_key:
            self.handovers[height] = signed.next_key
        else:
            self.handovers.pop(height, None)

    def record(self, target: SignTarget, msg: bytes) -> None:
        """Remember a request (and its message) this signer made a partial signature for."""
        if isinstance(target, Checkpoint):
            self.checkpoints[target.height] = msg
            if target.next_key:
                self.handovers[target.height] = target.next_key
