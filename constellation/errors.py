"""Errors that callers can cause, each with a stable code for the API edge.

Broken invariants of our own state are ``assert``s, never these.
"""

from __future__ import annotations


class ConstellationError(ValueError):
    """Base of every rejection the core can return to a caller."""

    code = "error"


# -- decoding: malformed bytes or strings -------------------------------------------------


class DecodeError(ConstellationError):
    """The bytes are not a canonical encoding of the expected type."""

    code = "malformed"


class Truncated(DecodeError):
    code = "malformed.truncated"


class TrailingBytes(DecodeError):
    code = "malformed.trailing_bytes"


class UnsupportedVersion(DecodeError):
    code = "malformed.version"


class CountOutOfRange(DecodeError):
    code = "malformed.count"


class ValueOutOfRange(DecodeError):
    code = "malformed.value"


class NonCanonical(DecodeError):
    code = "malformed.non_canonical"


class InvalidKey(DecodeError):
    code = "malformed.key"


class InvalidAddress(DecodeError):
    code = "malformed.address"


# -- stateless transaction rules ----------------------------------------------------------


class InvalidTransaction(ConstellationError):
    code = "invalid"


class DuplicateInput(InvalidTransaction):
    code = "invalid.duplicate_input"


class Unbalanced(InvalidTransaction):
    code = "invalid.unbalanced"


class BadSignature(InvalidTransaction):
    code = "invalid.signature"


class UnknownLedger(InvalidTransaction):
    """An output names a ledger this one does not settle with (its value would be owed
    to nobody)."""

    code = "invalid.ledger"


class TooLargeToSettle(InvalidTransaction):
    """An output to another ledger is worth more than one settlement batch carries: its
    obligation could never be paid, and would hold back every later one to that ledger."""

    code = "invalid.too_large_to_settle"


class Unsigned(InvalidTransaction):
    """A transaction to run must carry one witness per input; this one does not."""

    code = "invalid.unsigned"


# -- stateful rules: the partition state machine ------------------------------------------


class LedgerError(ConstellationError):
    code = "ledger"


class UnknownCoin(LedgerError):
    code = "ledger.unknown_coin"


class CoinSpent(LedgerError):
    code = "ledger.spent"


class InputLocked(LedgerError):
    """Another transaction holds a lock on an input: a conflict, never a wait."""

    code = "ledger.conflict"


class ValueMismatch(LedgerError):
    code = "ledger.value_mismatch"


class AlreadyCommitted(LedgerError):
    code = "ledger.already_committed"


class UnknownTransaction(LedgerError):
    code = "ledger.unknown_transaction"


class NotHeldHere(LedgerError):
    """A request touched a partition that this state does not hold."""

    code = "ledger.wrong_partition"


class BadIssuance(LedgerError):
    code = "ledger.bad_issuance"


class InFlight(LedgerError):
    """The same transaction is being committed already; its outcome will tell."""

    code = "ledger.in_flight"


class CommitTimeout(LedgerError):
    """The coordinator aborted: a participant did not vote in time. Retrying is safe."""

    code = "ledger.timeout"


class Unavailable(ConstellationError):
    """A service cannot do its work now (shutting down, a dependency failed); retry."""

    code = "unavailable"


# -- replication: what other copies of a shard send ---------------------------------------


class InvalidBlock(ConstellationError):
    """A block breaks a rule its leader had to check; ``index`` is the offending record."""

    code = "replication.invalid_block"

    def __init__(self, index: int, why: str) -> None:
        super().__init__(f"record {index}: {why}")
        self.index = index


class InvalidSnapshot(ConstellationError):
    """A snapshot that is malformed or describes no state a shard can be in."""

    code = "replication.invalid_snapshot"


# -- wallets ------------------------------------------------------------------------------


class InsufficientFunds(ConstellationError):
    code = "wallet.insufficient_funds"


# -- threshold signing --------------------------------------------------------------------


class SigningError(ConstellationError):
    """An input to a FROST function breaks its precondition (bad length, set, share)."""

    code = "signing.invalid_input"


class InvalidContribution(SigningError):
    """A participant (or the coordinator, ``signer_id`` None) sent an invalid value.

    ``contrib`` names it: ``pubnonce``, ``aggnonce`` or ``psig``. ROAST marks the sender
    malicious; nothing else about the session is trusted from it.
    """

    code = "signing.invalid_contribution"

    def __init__(self, signer_id: int | None, contrib: str) -> None:
        who = "the coordinator" if signer_id is None else f"signer {signer_id}"
        super().__init__(f"{who} sent an invalid {contrib}")
        self.signer_id = signer_id
        self.contrib = contrib


class UnknownNonce(SigningError):
    """A request names a nonce this signer never issued, already used, or forgot."""

    code = "signing.unknown_nonce"


class NonceReuse(SigningError):
    """A secret nonce was used a second time; reuse would reveal the secret share."""

    code = "signing.nonce_reuse"


# -- distributed key generation (ChillDKG) ------------------------------------------------


class DKGError(ConstellationError):
    """A malformed DKG message or argument (wrong length, not a point)."""

    code = "dkg.malformed"


class HostSeckeyError(DKGError):
    code = "dkg.host_seckey"


class RandomnessError(DKGError):
    code = "dkg.randomness"


class ThresholdOrCountError(DKGError):
    code = "dkg.threshold"


class InvalidHostPubkeyError(DKGError):
    code = "dkg.host_pubkey"

    def __init__(self, participant: int) -> None:
        super().__init__(f"host public key {participant} is not a valid point")
        self.participant = participant


class DuplicateHostPubkeyError(DKGError):
    code = "dkg.duplicate_host_pubkey"

    def __init__(self, participant1: int, participant2: int) -> None:
        super().__init__(f"participants {participant1} and {participant2} share a host key")
        self.participant1 = participant1
        self.participant2 = participant2


class DKGProtocolError(ConstellationError):
    """Someone in the session misbehaved; the subclass says who can be blamed."""

    code = "dkg.protocol"


class _BlamesParticipant(DKGProtocolError):
    def __init__(self, participant: int, message: str) -> None:
        super().__init__(f"participant {participant}: {message}")
        self.participant = participant


class FaultyParticipantOrCoordinatorError(_BlamesParticipant):
    """Participant ``participant`` is faulty, or the coordinator relayed it wrongly."""

    code = "dkg.faulty_participant_or_coordinator"


class FaultyParticipantError(_BlamesParticipant):
    """Seen by the coordinator, which talks to each participant directly."""

    code = "dkg.faulty_participant"


class FaultyCoordinatorError(DKGProtocolError):
    code = "dkg.faulty_coordinator"


# -- messages between services -------------------------------------------------------------


class MessageError(ConstellationError):
    """A message from another service or operator that we do not accept."""

    code = "protocol.malformed"


class NotAMember(MessageError):
    code = "protocol.not_member"


class BadMessageSignature(MessageError):
    code = "protocol.bad_signature"


class Misdirected(MessageError):
    """Addressed to another recipient (or another guild): a replay across recipients."""

    code = "protocol.misdirected"


class StaleMessage(MessageError):
    """Sent too long ago or too far in the future to be checked against replays."""

    code = "protocol.stale"


class Replayed(MessageError):
    code = "protocol.replay"


class Overloaded(ConstellationError):
    """A bounded queue or table is full; the caller may retry later."""

    code = "overloaded"


# -- the public API's own rules ------------------------------------------------------------


class KeyReused(ConstellationError):
    """An idempotency key came again with a different request."""

    code = "idempotency.key_reused"


# -- what the guild key signs --------------------------------------------------------------


class RequestRefused(ConstellationError):
    """A signer will not sign this request: invalid, not allowed, or conflicting."""

    code = "signing.refused"


class Equivocation(RequestRefused):
    """Signing would contradict something this signer has already signed."""

    code = "signing.equivocation"


class CheckpointBound(Equivocation):
    """This signer released shares for another checkpoint at this height and epoch (its
    standing there says which): the coordinator may show that the epoch is over."""

    code = "signing.checkpoint_bound"


# -- light-client proofs: each check that can fail has its own code ------------------------


class ProofRefused(ConstellationError):
    """A checkpoint or proof does not verify; ``check`` names the check that failed."""

    code = "proof"
    check = "proof"

    def __init__(self, message: str) -> None:
        super().__init__(f"{self.check}: {message}")


class WrongGuild(ProofRefused):
    code = "proof.guild"
    check = "guild"


class WrongMembers(ProofRefused):
    """The checkpoint names another member set than the one pinned."""

    code = "proof.members"
    check = "member set"


class BadCheckpointSignature(ProofRefused):
    code = "proof.checkpoint_signature"
    check = "checkpoint signature"


class BadHandover(ProofRefused):
    """Handovers that do not chain: not in height order, or one that names no next key."""

    code = "proof.handover"
    check = "handover"


class StaleCheckpoint(ProofRefused):
    """Older than a checkpoint the verifier has already seen: state may have moved on."""

    code = "proof.stale"
    check = "checkpoint height"


class BadEntryPath(ProofRefused):
    """A shard's entry is not under the checkpoint's commitment."""

    code = "proof.entry_path"
    check = "shard entry path"


class BadRecordPath(ProofRefused):
    code = "proof.record_path"
    check = "record path"


class BadCoinPath(ProofRefused):
    code = "proof.coin_path"
    check = "coin path"


class WrongSubject(ProofRefused):
    """The proof is about another transaction or coin than the one asked about."""

    code = "proof.subject"
    check = "subject"


class Unconfirmed(ProofRefused):
    """No record in the proof says the transaction was committed."""

    code = "proof.unconfirmed"
    check = "commit record"
