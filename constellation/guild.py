"""What the guild key signs, and why: typed signing requests and each signer's policy.

A signer never signs bytes it is handed. A request names its purpose and carries what
the message is derived from; each signer derives the message itself, checks it against
its own rules (and its own history, so it never signs two conflicting checkpoints) and
only then contributes a partial signature.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from enum import StrEnum
from typing import NamedTuple

import msgspec

from constellation.bitcoin import SpendInput, SpendOutput, p2tr_script, taproot_sighash
from constellation.codec import u32, u64
from constellation.crypto import frost
from constellation.errors import CheckpointBound, Equivocation, RequestRefused
from constellation.hashing import tagged_hasher
from constellation.keys import schnorr_sign, schnorr_verify

MAX_STATEMENT_BYTES = 1024
GUILD_ID_MAX_LEN = 64

_checkpoint_hash = tagged_hasher("Constellation/checkpoint")
_deposit_tweak = tagged_hasher("Constellation/deposit")
_owned_hash = tagged_hasher("Constellation/owned-derivation")
_standing_hash = tagged_hasher("Constellation/checkpoint-standing")


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
    it spends, and signs only if that input is a taproot output of the guild's that the
    requesting member holds (``guild_output`` of the guild key moved by
    ``owned_derivation(requester, label)``, with the BIP341 key-path tweak) and no value
    is created. So a member spends only the coins paid to its own addresses (its mint's
    deposits and change): never the other members'.
    """

    version: int
    locktime: int
    inputs: list[SpendInput]
    outputs: list[SpendOutput]
    input_index: int
    label: bytes  # the signed input's address among the requester's: 32 bytes


class GuildOutput(NamedTuple):
    """A key of the guild's on-chain funds, and the FROST tweaks that sign for it."""

    xonly: bytes  # the taproot output key
    tweaks: tuple[bytes, ...]
    is_xonly: tuple[bool, ...]


def owned_derivation(owner: bytes, label: bytes) -> bytes:
    """The derivation of guild address ``label`` (32 bytes) of member ``owner`` (its
    x-only host key): bound to the member, so that the guild signs a spend of it only at
    that member's request (``OnchainSpend``)."""
    return _owned_hash(owner + label)


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


def _derive_spend(spend: OnchainSpend, thresh_pk: bytes, requester: bytes) -> Derived:
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
    if len(requester) != 32 or len(spend.label) != 32:
        raise RequestRefused("a spend names a member's address: its label is 32 bytes")
    output = guild_output(thresh_pk, owned_derivation(requester, spend.label))
    if spend.inputs[spend.input_index].script_pubkey != p2tr_script(output.xonly):
        raise RequestRefused("the input to sign is not a guild output the requester holds")
    msg = taproot_sighash(
        spend.version, spend.locktime, spend.inputs, spend.outputs, spend.input_index
    )
    return Derived(Purpose.SPEND, msg, output.tweaks, output.is_xonly, output.xonly)


def derive(target: SignTarget, thresh_pk: bytes, requester: bytes = b"") -> Derived:
    """Check a request's form and derive the message it signs (raises RequestRefused).

    ``thresh_pk`` is the guild key (33 bytes): a spend must spend a guild output that
    ``requester`` holds (the x-only host key of the member whose coordinator asks)."""
    if isinstance(target, OnchainSpend):
        return _derive_spend(target, thresh_pk, requester)
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


MAX_EPOCH = 2**32 - 1


class Standing(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """A signer's signed word on one checkpoint height: the ``epoch`` it is at there, and
    the checkpoint (its message) it released shares for in that epoch (empty: none), or
    the one it learned the guild signed there (``SigningPolicy.learn``: the height is
    decided, and a standing naming its checkpoint only keeps an epoch from ending)."""

    member: int
    height: int
    epoch: int
    msg: bytes
    sig: bytes  # BIP340, by the member's identity key, over ``standing_digest``


class Stand(NamedTuple):
    """A signer's standing, and the certificate it entered its epoch by (the standings
    at the epoch below; empty at epoch 0)."""

    standing: Standing
    cert: list[Standing]


def standing_digest(guild: str, member: int, height: int, epoch: int, msg: bytes) -> bytes:
    name = guild.encode()
    return _standing_hash(
        u32(len(name)) + name + u32(member) + u64(height) + u32(epoch) + u32(len(msg)) + msg
    )


def make_standing(
    secret: bytes,
    guild: str,
    member: int,
    height: int,
    epoch: int,
    msg: bytes,
) -> Standing:
    sig = schnorr_sign(secret, standing_digest(guild, member, height, epoch, msg))
    return Standing(member, height, epoch, msg, sig)


class Quorum(NamedTuple):
    """The signers of a key (member indices) and how many of them sign."""

    holders: tuple[int, ...]
    t: int


def _standing_fault(
    guild: str, s: Standing, height: int, quorum: Quorum, identities: Sequence[bytes]
) -> str:
    """What is wrong with the standing ``s`` of a signer of ``quorum`` at ``height``
    (empty: nothing)."""
    if s.member not in quorum.holders or s.member >= len(identities):
        return f"a standing of member {s.member}, not one of the key's signers"
    if s.height != height or not 0 <= s.epoch <= MAX_EPOCH or len(s.msg) not in (0, 32):
        return f"member {s.member}'s standing is malformed or not one at height {height}"
    digest = standing_digest(guild, s.member, height, s.epoch, s.msg)
    if not schnorr_verify(identities[s.member], digest, s.sig):
        return f"member {s.member}'s standing is badly signed"
    return ""


def epoch_ended(
    guild: str,
    height: int,
    epoch: int,
    cert: Sequence[Standing],
    quorum: Quorum,
    identities: Sequence[bytes],
) -> bool:
    """Whether the standings ``cert`` (of ``quorum``'s signers, at ``height`` and
    ``epoch``) show that no checkpoint can be signed there any more: for every
    checkpoint, the signers standing by it and those whose word is missing (or who
    shared none there) are fewer than ``t``. ``identities``: each member's x-only
    identity key. A malformed certificate raises RequestRefused."""
    said: dict[int, bytes] = {}
    for s in cert:
        if s.epoch != epoch or s.member in said:
            raise RequestRefused(
                f"member {s.member}'s standing is not one of a certificate of epoch {epoch}"
            )
        fault = _standing_fault(guild, s, height, quorum, identities)
        if fault:
            raise RequestRefused(fault)
        said[s.member] = s.msg
    bound = Counter(msg for msg in said.values() if msg)
    open_ = len(quorum.holders) - sum(bound.values())
    return max(bound.values(), default=0) + open_ < quorum.t


def next_epoch(
    guild: str,
    height: int,
    epoch: int,
    stands: Sequence[Stand],
    quorum: Quorum,
    identities: Sequence[bytes],
) -> tuple[int, list[Standing]] | None:
    """Where a coordinator whose checkpoint at ``height`` was refused in ``epoch`` asks
    next, from the signers' ``stands`` there (untrusted: a bad one is left out): the
    highest epoch a signer entered, with the certificate it entered by; or the epoch
    above, where the standings at ``epoch`` show it ended. None: neither (a checkpoint
    of ``epoch`` can still be signed, or too few signers answered)."""
    good = {
        s.standing.member: s
        for s in stands
        if not _standing_fault(guild, s.standing, height, quorum, identities)
    }
    for s, cert in sorted(good.values(), key=lambda s: -s.standing.epoch):
        if s.epoch <= epoch:
            break
        try:
            if epoch_ended(guild, height, s.epoch - 1, cert, quorum, identities):
                return s.epoch, cert
        except RequestRefused:
            continue
    at = [s.standing for s in good.values() if s.standing.epoch == epoch]
    if epoch < MAX_EPOCH and epoch_ended(guild, height, epoch, at, quorum, identities):
        return epoch + 1, at
    return None


class SigningPolicy:
    """One signer's rules, and the memory of what it signed that they depend on.

    ``allowed`` lists the purposes this operator signs for; a checkpoint must be for
    this guild, must not conflict with another checkpoint signed at its height and
    epoch, must extend the checkpoint signed at the height below when there is one, and
    above a handover this signer signed or learned of must be signed by the key handed
    over to.

    **Epochs.** With ``t`` of ``n`` signing and ``2t > n``, a signer that releases
    shares for one checkpoint per height keeps the guild to one checkpoint per height.
    But proposals made at one height by several proposers may each hold shares of
    signers that share no other, none reaching ``t``: the height would stay unsigned for
    good. So a height has epochs: a signer shares for at most one checkpoint per height
    and epoch, never in an epoch below its own, and enters epoch ``e > 0`` only with a
    certificate that ``e - 1`` ended (``epoch_ended``: standings of the signers at
    ``e - 1``, each signed with its identity key). Safety: a checkpoint signed in epoch
    ``e`` holds ``t`` shares released there; each of those signers gave no standing at
    ``e`` or one naming that checkpoint, so no certificate of ``e`` exists; no signer
    enters ``e + 1``, and none a later epoch (a standing naming a checkpoint at ``e + 1``
    comes from a signer that entered it). A signer that holds several keys enters an
    epoch only where it ended for each of them: a checkpoint signed by any key it holds
    stops it. Liveness: with every signer's standing at the top epoch, either a
    checkpoint there can still get ``t`` shares (its own and those of the signers bound
    to none) or the standings are the certificate; between a key's making and the old
    key's retirement, the old key's signers must all answer too.
    ``identities`` are the members' x-only identity keys, by member index.
    """

    def __init__(
        self, guild: str, allowed: frozenset[Purpose], identities: Sequence[bytes] = ()
    ) -> None:
        self.guild = guild
        self.allowed = allowed
        self.identities = tuple(identities)
        self.checkpoints: dict[int, bytes] = {}  # height -> message signed
        # height -> the epoch of that share, and the certificate that let it in
        self.epochs: dict[int, tuple[int, list[Standing]]] = {}
        self.decided: set[int] = set()  # heights the guild signed (``learn``)
        self.handovers: dict[int, bytes] = {}  # height -> the key that signs above it

    def check(
        self,
        target: SignTarget,
        thresh_pk: bytes,
        epoch: int = 0,
        cert: Sequence[Standing] = (),
        quorums: Sequence[Quorum] = (),
        requester: bytes = b"",
    ) -> Derived:
        """Derive the request's message and apply every rule (raises RequestRefused);
        ``requester`` is the asking member's x-only host key (a spend is of its coins).
        A checkpoint in an ``epoch`` above 0 comes with the ``cert`` that the one below
        ended among the signers of every key this signer signs with (``quorums``, the
        request's among them): a signer's binding at a height holds for all its keys,
        so an epoch ended for one key only (two keys are usable between a key's making
        and the old one's retirement) could let the other sign a second checkpoint."""
        derived = derive(target, thresh_pk, requester)
        if derived.purpose not in self.allowed:
            raise RequestRefused(f"this signer does not sign {derived.purpose} requests")
        if not isinstance(target, Checkpoint):
            if epoch or cert:
                raise RequestRefused("only a checkpoint is signed in an epoch")
            return derived
        if target.guild != self.guild:
            raise RequestRefused(f"checkpoint of guild {target.guild!r}, not ours")
        if not 0 <= epoch <= MAX_EPOCH:
            raise RequestRefused("epoch out of range")
        if epoch == 0 and cert:
            raise RequestRefused("a certificate comes only with an epoch above 0")
        if epoch > 0 and not (
            quorums
            and all(
                epoch_ended(
                    self.guild,
                    target.height,
                    epoch - 1,
                    [c for c in cert if c.member in q.holders],
                    q,
                    self.identities,
                )
                for q in quorums
            )
        ):
            raise RequestRefused(f"no certificate that epoch {epoch - 1} ended")
        self.check_history(target, derived.msg, thresh_pk, epoch)
        return derived

    def check_history(
        self, target: SignTarget, msg: bytes, thresh_pk: bytes, epoch: int = 0
    ) -> None:
        """The rules that depend on what was signed since: checked again just before
        signing, as a concurrent request may have signed a conflicting checkpoint, or a
        handover below it to another key than ``thresh_pk``."""
        if not isinstance(target, Checkpoint):
            return
        height = target.height
        below_handovers = [h for h in self.handovers if h < height]
        if below_handovers and self.handovers[max(below_handovers)] != thresh_pk[1:]:
            raise Equivocation(
                f"checkpoint {height} is not signed by the key that signs"
                f" above height {max(below_handovers)}"
            )
        signed = self.checkpoints.get(height)
        held = self.epochs.get(height, (0, []))[0]
        if signed is not None and signed != msg:
            if height in self.decided:
                raise Equivocation(f"the guild signed another checkpoint at height {height}")
            if epoch <= held:
                raise CheckpointBound(
                    f"a different checkpoint at height {height} was signed already (epoch {held})"
                )
        elif signed is not None and epoch < held:
            raise CheckpointBound(f"height {height} is at epoch {held} here, not {epoch}")
        below = self.checkpoints.get(height - 1)
        if below is not None and below != target.prev_hash:
            raise Equivocation(f"checkpoint {height} does not extend the one signed below it")

    def stand(self, height: int, member: int, secret: bytes) -> Stand:
        """This signer's standing at ``height``, signed with its identity key
        ``secret`` (it is ``member``), and how it entered its epoch there."""
        epoch, cert = self.epochs.get(height, (0, []))
        msg = self.checkpoints.get(height, b"")
        return Stand(make_standing(secret, self.guild, member, height, epoch, msg), cert)

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
        self.decided.add(height)
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

    def record(
        self, target: SignTarget, msg: bytes, epoch: int = 0, cert: Sequence[Standing] = ()
    ) -> None:
        """Remember a request (and its message) this signer made a partial signature
        for, in ``epoch`` (let in by ``cert``)."""
        if isinstance(target, Checkpoint):
            self.checkpoints[target.height] = msg
            if epoch > self.epochs.get(target.height, (0, []))[0]:
                self.epochs[target.height] = epoch, list(cert)
            if target.next_key:
                self.handovers[target.height] = target.next_key
