"""Spending conditions (NUT-10) and pay-to-public-key (NUT-11): ecash whose secret says
who may spend it.

A well-known secret is the JSON text ``["KIND", {"nonce": …, "data": …, "tags": [[…]]}]``.
This mint enforces kind ``P2PK``: ``data`` is a public key (33 bytes, hex), and the tags
may add ``pubkeys`` (more keys), ``n_sigs`` (how many of the keys must sign, default 1),
``locktime`` (a unix time) with ``refund`` keys and ``n_sigs_refund``, and ``sigflag``:

* ``SIG_INPUTS`` (the default): each proof's witness holds BIP340 signatures over
  SHA256 of its own secret's text;
* ``SIG_ALL``: every input carries the same conditions (kind, data, tags; the nonce may
  differ), and the first input's witness signs the whole request: each input's secret
  and C, then each output's amount and B_, then (a melt) the quote id.

A proof spends with ``n_sigs`` valid signatures by distinct keys of ``data`` and
``pubkeys``, at any time; once its locktime has passed, also with ``n_sigs_refund`` by
distinct ``refund`` keys, or with none at all where it names no refund key. Anything
else (another kind, a malformed secret, tag or witness) is refused: a condition the mint
does not understand is never spent as if it were not there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from constellation.keys import schnorr_verify
from constellation.protocol import cashu as nut

SIG_INPUTS, SIG_ALL = "SIG_INPUTS", "SIG_ALL"
MAX_CHECKS = 1000  # signature checks in one request (about 50 ms of CPU)
JSON_SPACE = " \t\n\r"  # what JSON takes as whitespace around a value


class ConditionError(ValueError):
    """A proof whose spending conditions are not met, or not understood (why, in words)."""


# The tags NUT-11 gives a meaning, each at most once in a secret (others are ignored).
TAGS = ("sigflag", "pubkeys", "n_sigs", "locktime", "refund", "n_sigs_refund")


@dataclass(frozen=True)
class Condition:
    """A P2PK secret's conditions, checked whole when it is read: its signing keys and
    refund keys (x-only, each at most once in its path), how many of each must sign,
    its locktime (None: a permanent lock) and its signature flag."""

    kind: str
    data: str
    tags: tuple[tuple[str, ...], ...]
    keys: tuple[bytes, ...]
    needed: int
    locktime: int | None
    refund: tuple[bytes, ...]
    needed_refund: int
    sigflag: str


def condition_of(secret: str) -> Condition | None:
    """The spending condition of a secret, or None where it is a plain one. Whatever a
    wallet may read as a NUT-10 secret (a JSON array, whitespace around it, that starts
    with a kind) is one here too: refused unless it is exactly a P2PK this mint
    enforces, so a token locked for a wallet is never spendable by anyone at the mint.
    A secret NUT-11 calls malformed is refused (``ConditionError``): a tag of its own
    given twice (a wallet may read either value), a key twice in one path, more
    signatures needed than its path has keys."""
    if not secret.lstrip(JSON_SPACE).startswith("["):  # no JSON array (a plain secret)
        return None
    try:
        doc = json.loads(secret)
    except ValueError:
        return None
    except RecursionError:  # a wallet may read a lock in it: never spent as plain
        raise ConditionError("a secret of JSON nested too deeply") from None
    if not (isinstance(doc, list) and doc and isinstance(doc[0], str)):
        return None
    if len(doc) != 2:
        raise ConditionError("a NUT-10 secret is [kind, {nonce, data, tags}]")
    kind, body = doc
    if kind != "P2PK":
        raise ConditionError(f"spending condition {kind[:16]!r} is not supported: P2PK is")
    if not isinstance(body, dict) or not isinstance(body.get("data"), str):
        raise ConditionError("a P2PK secret's second element is {nonce, data, tags}")
    tags = body.get("tags") or []
    if not isinstance(tags, list) or not all(
        isinstance(t, list) and t and all(isinstance(v, str) for v in t) for t in tags
    ):
        raise ConditionError("a P2PK secret's tags are lists of strings")
    named: dict[str, list[str]] = {}
    for t in tags:
        if t[0] in TAGS:
            if t[0] in named:
                raise ConditionError(f"tag {t[0]!r} given more than once")
            named[t[0]] = t[1:]
    flag = (named.get("sigflag") or [SIG_INPUTS])[0]
    if flag not in (SIG_INPUTS, SIG_ALL):
        raise ConditionError(f"sigflag {flag[:16]!r}: SIG_INPUTS or SIG_ALL")
    keys = _keys([body["data"], *named.get("pubkeys", [])], "its keys")
    refund = _keys(named.get("refund", []), "its refund keys")
    if "n_sigs_refund" in named and not refund:
        raise ConditionError("tag 'n_sigs_refund' without refund keys")
    needed = _number(named, "n_sigs", len(keys))
    needed_refund = _number(named, "n_sigs_refund", len(refund))
    # not a unix time: a permanent lock (NUT-11)
    locktime = _integer((named.get("locktime") or [""])[0])
    return Condition(
        kind,
        body["data"],
        tuple(tuple(t) for t in tags),
        keys,
        needed,
        locktime,
        refund,
        needed_refund,
        flag,
    )


def _keys(keys: list[str], path: str) -> tuple[bytes, ...]:
    """Compressed public keys, x-only, refused where one is given twice (by x)."""
    xonly = []
    for key in keys:
        try:
            raw = bytes.fromhex(key)
        except ValueError:
            raise ConditionError(f"not a public key: {key[:66]!r}") from None
        if len(raw) != 33 or raw[0] not in (2, 3):
            raise ConditionError(f"not a compressed public key: {key[:66]!r}")
        if raw[1:] in xonly:
            raise ConditionError(f"a key given twice in {path}: {key[:66]!r}")
        xonly.append(raw[1:])
    return tuple(xonly)


def _number(named: dict[str, list[str]], name: str, most: int) -> int:
    """Tag ``name``'s count of signatures: 1 where it is absent, at most ``most``."""
    found = named.get(name)
    if found is None:
        return 1
    value = _integer(found[0] if found else "")
    if value is None:
        raise ConditionError(f"tag {name!r} is not a positive number: {found[:1]!r}")
    if not 1 <= value <= most:
        raise ConditionError(f"tag {name!r} is {value}: at least 1, at most {most} (its keys)")
    return value


def _integer(text: str) -> int | None:
    """``text`` as a number of ASCII digits only, as every wallet reads it (Python's
    ``int`` also takes signs, spaces, underscores and other scripts' digits: a lock a
    wallet reads as permanent would expire here), or None."""
    if not (0 < len(text) <= 20 and text.isascii() and text.isdigit()):
        return None
    return int(text)


def check(
    proofs: Sequence[nut.Proof],
    outputs: Sequence[nut.BlindedMessage],
    now: int,
    quote: str = "",
) -> None:
    """Refuse (``ConditionError``) unless every proof's conditions are met by the
    request: its outputs and, for a melt, its quote id (what SIG_ALL signs)."""
    conditions = [condition_of(p.secret) for p in proofs]
    budget = [MAX_CHECKS]
    if any(c is not None and c.sigflag == SIG_ALL for c in conditions):
        first = conditions[0]
        if first is None or any(
            c is None or (c.kind, c.data, c.tags) != (first.kind, first.data, first.tags)
            for c in conditions
        ):
            raise ConditionError("SIG_ALL: every input must carry the same conditions")
        msg = "".join(p.secret + p.C for p in proofs)
        msg += "".join(f"{o.amount}{o.B_}" for o in outputs) + quote
        _met(first, msg, proofs[0].witness, now, budget)
        return
    for p, c in zip(proofs, conditions, strict=True):
        if c is not None:
            _met(c, p.secret, p.witness, now, budget)


def _met(c: Condition, msg: str, witness: str | None, now: int, budget: list[int]) -> None:
    expired = c.locktime is not None and now >= c.locktime
    signatures = _signatures(witness)  # malformed witnesses: refused, always
    if expired and not c.refund:
        return  # the lock expired and names no refund key: anyone spends it
    digest = hashlib.sha256(msg.encode()).digest()
    if _signed(c.keys, c.needed, signatures, digest, budget):
        return
    if not expired:
        raise ConditionError(f"P2PK: {c.needed} valid signature(s) of its keys needed")
    if not _signed(c.refund, c.needed_refund, signatures, digest, budget):
        raise ConditionError(f"P2PK: locktime passed; {c.needed_refund} refund signature(s) needed")


def _signatures(witness: str | None) -> list[bytes]:
    if not witness:
        return []
    try:
        doc: Any = json.loads(witness)
        return [bytes.fromhex(s) for s in doc.get("signatures", [])]
    except (ValueError, AttributeError, TypeError, RecursionError):
        raise ConditionError('a P2PK witness is {"signatures": [hex, ...]}') from None


def _signed(
    keys: Sequence[bytes], needed: int, signatures: list[bytes], digest: bytes, budget: list[int]
) -> bool:
    """Whether ``needed`` of ``keys`` (distinct, x-only) signed ``digest`` (among
    ``signatures``), each check taken from the request's ``budget`` (however many keys a
    condition names, or signatures a witness holds: the mint signs outputs blind, so it
    cannot refuse to issue a lock; it bounds the work a spend costs instead)."""
    found = 0
    for k in keys:
        for s in signatures:
            budget[0] -= 1
            if budget[0] < 0:
                raise ConditionError(f"more than {MAX_CHECKS} signature checks in one request")
            if schnorr_verify(k, digest, s):
                found += 1
                break
        if found >= needed:
            return True
    return False
