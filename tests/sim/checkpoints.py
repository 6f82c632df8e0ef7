"""The checkpoints' simulator: three members' checkpointers
(``constellation.lightclient.checkpointer``) and their signers' rules
(``constellation.guild.SigningPolicy``), the production code, through member 2 leaving
and the handover of the checkpoints from the guild's first key (2 of members 0, 1, 2) to
the key the two that stay made (2 of 2), under a seeded fault schedule:

* announcements lost, late and out of order; signing requests lost;
* a signing session that fails after some signers released shares (they stay bound to
  that checkpoint at its height and epoch); a proposal refused by a signer bound to
  another asks the signers' standings and goes on in the epoch they allow
  (``constellation.guild.next_epoch``), as the signers' coordinator does;
* with ``splits``, proposers that take over ten times sooner and sessions that fail
  after one share, which split the shares of one height between proposals far more
  often (``--splits``);
* members restarted from what they stored, the proposal they sent last included, their
  signers too, with what their audit log holds: every share released, lost or not (what
  a signer learned from evidence is gone);
* each member's operator sets the handover at its own time, after member 2 left (which
  it does once no share is out for an unsigned checkpoint: ``settled``).

Checked at every step: one checkpoint signed per height, each by the key the chain names
for its height (the first key up to the handover, the new one above); every member's
chain that one. Once the faults stop: the handover is made and the checkpoints go on
under the new key at both members that stay.

    python -m tests.sim --checkpoints --seeds N
"""

from __future__ import annotations

import hashlib
import random

from constellation.errors import CheckpointBound, RequestRefused
from constellation.guild import (
    Checkpoint,
    Purpose,
    Quorum,
    SigningPolicy,
    Standing,
    next_epoch,
)
from constellation.keys import SigningKey
from constellation.lightclient import index as lc
from constellation.lightclient import proof as pf
from constellation.lightclient.checkpointer import (
    Announced,
    Checkpointer,
    Evidence,
    signed_below,
)
from constellation.protocol.ledger import BlockEvents
from tests.lightclient.test_checkpointer import issuance
from tests.sim.guild import Violation

GUILD = "sim"
OLD = SigningKey(hashlib.sha256(b"the first key").digest())
NEW = SigningKey(hashlib.sha256(b"the key after the leave").digest())
OPERATORS = [(f"op{i}", hashlib.sha256(f"op{i}".encode()).digest()) for i in range(3)]
FIRST_MEMBERS = pf.members_root(2, OPERATORS)
NEW_MEMBERS = pf.members_root(2, OPERATORS[:2])
PIN = pf.Pin(GUILD, bytes(OLD.pubkey), FIRST_MEMBERS)
SHARDS = [(o, w) for o in range(3) for w in range(2)]
SIGNERS = {bytes(OLD.pubkey): [0, 1, 2], bytes(NEW.pubkey): [0, 1]}  # 2 of them sign
IDENTITY = [SigningKey(hashlib.sha256(f"identity {i}".encode()).digest()) for i in range(3)]
IDENTITIES = [bytes(k.pubkey) for k in IDENTITY]
CADENCE, TAKEOVER, IDLE = 1000, 3000, 10_000
ANNOUNCE_MS = 2000


class Member:
    def __init__(self, rank: int, takeover_ms: int = TAKEOVER) -> None:
        self.rank = rank
        self.takeover_ms = takeover_ms
        self.retired = False  # its signer signs with the new key only (its keystore says)
        self.up = True
        self.applied = 0  # blocks applied (a restart reads them again from its copies)
        self.stored: dict[int, Announced] = {}
        # the shares its signer released: checkpoint, message, epoch, certificate
        self.audit: list[tuple[Checkpoint, bytes, int, list[Standing]]] = []
        self.policy = self.signer()
        self.announced_at = 0
        self.proposal: tuple[Checkpoint, Evidence] | None = None  # kept across restarts
        self.ck = self.fresh()

    def signer(self) -> SigningPolicy:
        """The signer's rules, as it starts: the shares in its audit log recorded."""
        policy = SigningPolicy(GUILD, frozenset(Purpose), IDENTITIES)
        for checkpoint, msg, epoch, cert in self.audit:
            policy.record(checkpoint, msg, epoch, cert)
        return policy

    def fresh(self) -> Checkpointer:
        index = lc.GuildIndex(GUILD, FIRST_MEMBERS, SHARDS)
        ck = Checkpointer(index, PIN, self.rank, CADENCE, self.takeover_ms, IDLE)
        ck.signers = {key: (members, 2) for key, members in SIGNERS.items()}
        return ck


class CheckpointSim:
    def __init__(self, seed: int, steps: int = 500, splits: bool = False) -> None:
        self.rng = random.Random(seed)
        # ``splits``: proposers take over ten times sooner, and a session fails after one
        # share now and then (a stream of its own: a seed without splits plays as always)
        self.splits = random.Random(-1 - seed) if splits else None
        self.steps = steps
        self.calm = steps * 6 // 10  # no faults from this step on
        self.now = 0
        self.blocks: list[tuple[int, BlockEvents]] = []
        self.heights = dict.fromkeys(SHARDS, 0)
        self.members = [Member(r, TAKEOVER // 10 if splits else TAKEOVER) for r in range(3)]
        self.left = self.rng.randint(10, self.calm // 2)  # member 2 stops here
        self.gone = False  # member 2 left (it was only down before)
        self.hand = {m: self.rng.randint(self.left, self.calm) for m in (0, 1)}
        self.signed: dict[int, bytes] = {}  # the guild's one chain: height -> message
        self.key_at: dict[int, bytes] = {}
        self.handover: int | None = None
        self.inbox: list[tuple[int, int, Announced]] = []  # (when, to whom, what)
        self.back: dict[int, int] = {}  # member down -> the step it restarts at
        self.log: list[str] = []

    def run(self) -> None:
        for step in range(self.steps):
            faults = step < self.calm
            self.now += self.rng.randint(50, 400)
            if self.rng.random() < 0.6:
                self.pay()
            if step >= self.left and self.members[2].up and self.settled():
                self.left = step
                self.gone = True
                self.members[2].up = False
                self.back.pop(2, None)
                self.log.append(f"{self.now}: member 2 left")
            for m, back in list(self.back.items()):
                if step >= back or not faults:
                    del self.back[m]
                    self.restart(m)
            for m in (0, 1):  # what each operator's key plan tells its indexer
                member = self.members[m]
                if self.gone and member.up:
                    member.ck.signers[bytes(OLD.pubkey)] = [0, 1], 2  # 2 signs no more
                if step >= self.hand[m] and member.up:
                    member.ck.handover = bytes(NEW.pubkey), NEW_MEMBERS
                if member.up and member.ck.pin.handed >= 0:
                    member.retired = True  # handed over: the old key retired
            if faults and self.rng.random() < 0.03:
                m = self.rng.choice([0, 1] if step >= self.left else [0, 1, 2])
                self.members[m].up = False
                self.back[m] = step + self.rng.randint(0, 15)
                self.log.append(f"{self.now}: member {m} down")
            for m, member in enumerate(self.members):
                if member.up:
                    self.follow(m, faults)
            self.deliver(faults)
            for m, member in enumerate(self.members):
                if member.up:
                    self.propose(m, faults)
            self.check()
        self.check_end()

    # -- the world ------------------------------------------------------------------------

    def settled(self) -> bool:
        """No signer released a share above the last checkpoint signed, and the members
        that stay took that one: a leaver goes only then, since its share may be the one
        that decides between two proposals at one height (each with one share of the two
        that stay, which sign no other), and it may hold the only copy of the last
        checkpoint signed (its own, its announcement lost)."""
        top = max(self.signed, default=-1)
        took = all(self.members[m].ck.index.next_height > top for m in (0, 1))
        return took and not any(h > top for m in self.members for h in m.policy.checkpoints)

    def pay(self) -> None:
        self.blocks.append(issuance(self.rng, self.heights))

    def follow(self, m: int, faults: bool) -> None:
        """Member ``m`` reads some of the blocks it has not applied (all, once calm)."""
        member = self.members[m]
        upto = len(self.blocks)
        if faults:
            upto = self.rng.randint(member.applied, upto)
        for owner, events in self.blocks[member.applied : upto]:
            member.ck.index.apply(owner, events)
        member.applied = upto
        self.keep(m, member.ck.advance(self.now))
        if self.now - member.announced_at >= ANNOUNCE_MS and member.ck.index.last is not None:
            member.announced_at = self.now
            last = member.ck.index.last
            self.announce(m, Announced(last.checkpoint, [c.entry for c in last.covered.values()]))

    def restart(self, m: int) -> None:
        """Member ``m``'s indexer and signer restart: its index read again from its
        copies, its stored checkpoints restored (its operator sets the handover again
        later), its signer's rules from its audit log."""
        member = self.members[m]
        member.up = True
        member.ck = member.fresh()
        member.policy = member.signer()
        for owner, events in self.blocks[: member.applied]:
            member.ck.index.apply(owner, events)
        for height in sorted(member.stored):
            member.ck.restore(member.stored[height])
        if member.proposal is not None:
            member.ck.resume(member.proposal)
        self.keep(m, member.ck.advance(self.now))
        self.log.append(f"{self.now}: member {m} restarted at {member.ck.index.next_height}")

    def keep(self, m: int, taken: list[lc.Signed]) -> None:
        for signed in taken:
            entries = [c.entry for c in signed.covered.values()]
            self.members[m].stored[signed.checkpoint.checkpoint.height] = Announced(
                signed.checkpoint, entries
            )

    def announce(self, m: int, announced: Announced) -> None:
        for to in range(3):
            if to != m:
                self.inbox.append((self.now + self.rng.randint(0, 1500), to, announced))

    def deliver(self, faults: bool) -> None:
        due = [item for item in self.inbox if item[0] <= self.now]
        self.inbox = [item for item in self.inbox if item[0] > self.now]
        self.rng.shuffle(due)
        for _, to, announced in due:
            member = self.members[to]
            if not member.up or (faults and self.rng.random() < 0.2):
                continue
            try:
                self.keep(to, member.ck.take(announced, self.now))
            except ValueError as exc:  # refused: not the guild's, or above a handover unheard
                c = announced.signed.checkpoint
                if self.signed.get(c.height) == c.message() and (
                    member.ck.pin.at(c.height)[0] == self.key_at[c.height]
                ):
                    raise Violation(
                        f"member {to} refused the guild's checkpoint {c.height}: {exc}"
                    ) from None

    def propose(self, m: int, faults: bool) -> None:
        member = self.members[m]
        proposal = member.ck.due(self.now)
        if proposal is None:
            return
        member.proposal = proposal
        checkpoint, evidence = proposal
        key = member.ck.signing_key(checkpoint.height)
        quorum = Quorum(tuple(SIGNERS[key]), 2)
        epoch, cert = 0, list[Standing]()
        for _ in range(3):
            shares, bound = [], False
            for s in self.rng.sample(SIGNERS[key], len(SIGNERS[key])):
                answer = self.sign_share(s, checkpoint, evidence, key, faults, epoch, cert)
                shares += [s] if answer is True else []
                bound |= answer is CheckpointBound
                if self.splits and faults and shares and self.splits.random() < 0.3:
                    self.log.append(f"{self.now}: member {m}'s session failed after a share")
                    return
                if len(shares) == 2:
                    break
            if len(shares) == 2 or not bound:
                break
            stands = [
                self.members[s].policy.stand(checkpoint.height, s, IDENTITY[s].secret)
                for s in SIGNERS[key]
                if self.members[s].up and not (faults and self.rng.random() < 0.1)
            ]
            found = next_epoch(GUILD, checkpoint.height, epoch, stands, quorum, IDENTITIES)
            if found is None:
                break
            epoch, cert = found
            self.log.append(f"{self.now}: member {m} asks at {checkpoint.height}/{epoch}")
        if len(shares) < 2 or (faults and self.rng.random() < 0.1):
            return  # too few, or the session failed after shares were released
        signer = OLD if key == bytes(OLD.pubkey) else NEW
        signed = pf.SignedCheckpoint(checkpoint, signer.sign(checkpoint.message()))
        height, msg = checkpoint.height, checkpoint.message()
        if self.signed.setdefault(height, msg) != msg:
            raise Violation(f"two checkpoints signed at height {height}")
        self.key_at[height] = key
        if checkpoint.next_key:
            if self.handover is not None:
                raise Violation(f"a second handover, at {height} (first at {self.handover})")
            self.handover = height
            self.log.append(f"{self.now}: handover at {height} by member {m}")
        announced = Announced(signed, evidence.entries)
        self.keep(m, member.ck.take(announced, self.now))
        self.announce(m, announced)

    def sign_share(
        self,
        s: int,
        checkpoint: Checkpoint,
        evidence: Evidence,
        key: bytes,
        faults: bool,
        epoch: int,
        cert: list[Standing],
    ) -> bool | type[CheckpointBound]:
        """Signer ``s`` asked: its ledger vouches, its rules allow, it releases a share
        (True); CheckpointBound where it is bound to another checkpoint there."""
        member = self.members[s]
        if not member.up or (faults and self.rng.random() < 0.1):
            return False
        below = signed_below(checkpoint, evidence.encode(), list(SIGNERS))
        if below is not None:
            member.policy.learn(*below)
        reason, taken = member.ck.vouch(checkpoint, evidence, self.now)
        self.keep(s, taken)
        if reason != "":
            return False
        # every key its signer signs with: both until the old one retired (not member 2)
        keys = [k for k, holders in SIGNERS.items() if s in holders]
        keys = [bytes(NEW.pubkey)] if member.retired else keys
        if key not in keys:
            return False
        quorums = [Quorum(tuple(SIGNERS[k]), 2) for k in keys]
        try:
            derived = member.policy.check(checkpoint, b"\x02" + key, epoch, cert, quorums)
        except CheckpointBound:
            return CheckpointBound
        except RequestRefused:
            return False
        member.policy.record(checkpoint, derived.msg, epoch, cert)
        member.audit.append((checkpoint, derived.msg, epoch, cert))
        return True

    # -- what must hold --------------------------------------------------------------------

    def check(self) -> None:
        for height, key in self.key_at.items():
            handed = self.handover is not None and height > self.handover
            if key != (bytes(NEW.pubkey) if handed else bytes(OLD.pubkey)):
                raise Violation(f"checkpoint {height} signed by the wrong key")
        for m, member in enumerate(self.members):
            for height, announced in member.stored.items():
                if self.signed.get(height) != announced.signed.checkpoint.message():
                    raise Violation(f"member {m} holds another checkpoint at {height}")

    def check_end(self) -> None:
        """Calm since step ``calm``: the handover was made, and both members that stay
        took it and checkpoints above it, signed by the new key."""
        if self.handover is None:
            raise Violation("no handover once calm")
        top = max(self.signed)
        if top <= self.handover:
            raise Violation(f"no checkpoint above the handover at {self.handover}")
        for m in (0, 1):
            ck = self.members[m].ck
            if ck.pin.handed != self.handover or ck.index.next_height <= self.handover + 1:
                raise Violation(f"member {m} did not follow the handover")
