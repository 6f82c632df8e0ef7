"""Messages of the signer service: ChillDKG, ROAST signing, and the operator's requests.

Each is a msgspec struct tagged with its kind and encoded as MessagePack; unknown
fields and unknown kinds are refused. They travel inside signed envelopes
(``constellation.protocol.envelope``), which say who sent them.
"""

from __future__ import annotations

import msgspec

from constellation.errors import MessageError
from constellation.guild import SignTarget, Standing


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind"):
    pass


# -- signing (coordinator <-> signers) -----------------------------------------------------


class SignStart(_Msg, frozen=True, tag="sign.start"):
    """Coordinator -> every signer: what to sign and why.

    With ``presign`` the signer answers with a fresh nonce (``Presign``); without, the
    coordinator holds one of its nonces already and may start a session at once.
    """

    request_id: bytes
    target: SignTarget
    presign: bool = True
    evidence: bytes = b""  # what a checkpoint's entries are (each signer's ledger checks)
    key: bytes = b""  # the guild key that signs (33 bytes); empty: the active one
    epoch: int = 0  # a checkpoint's epoch at its height (``constellation.guild``)
    cert: list[Standing] = []  # above epoch 0: the standings that show the one below ended


class Presign(_Msg, frozen=True, tag="sign.presign"):
    """Signer -> coordinator: ready, with a fresh public nonce."""

    request_id: bytes
    pubnonce: bytes


class SignSession(_Msg, frozen=True, tag="sign.session"):
    """Coordinator -> the signers of one ROAST session: sign with these nonces."""

    request_id: bytes
    session_id: int
    ids: list[int]
    pubnonces: list[bytes]


class Share(_Msg, frozen=True, tag="sign.share"):
    """Signer -> coordinator: a partial signature and the next nonce."""

    request_id: bytes
    session_id: int
    psig: bytes
    pubnonce: bytes


class SignRefused(_Msg, frozen=True, tag="sign.refused"):
    """Signer -> coordinator: this signer will not sign the request, and why."""

    request_id: bytes
    code: str
    reason: str


class StandingAsk(_Msg, frozen=True, tag="sign.standing_ask"):
    """Coordinator -> every signer of a key: a checkpoint of ``request_id`` was refused
    as bound to another at ``height``: say where you stand there."""

    request_id: bytes
    height: int


class StandingSaid(_Msg, frozen=True, tag="sign.standing"):
    """Signer -> coordinator: its signed standing at the height asked, and the
    certificate it entered its epoch there by."""

    request_id: bytes
    standing: Standing
    cert: list[Standing]


class SignDone(_Msg, frozen=True, tag="sign.done"):
    """Coordinator -> every signer: the request finished (signature, or empty if it failed)."""

    request_id: bytes
    signature: bytes


# -- key generation (coordinator <-> participants) -----------------------------------------


class DkgStart(_Msg, frozen=True, tag="dkg.start"):
    dkg_id: bytes
    hostpubkeys: list[bytes]
    t: int


class DkgMsg1(_Msg, frozen=True, tag="dkg.pmsg1"):
    dkg_id: bytes
    pmsg1: bytes


class DkgCoord1(_Msg, frozen=True, tag="dkg.cmsg1"):
    dkg_id: bytes
    cmsg1: bytes


class DkgMsg2(_Msg, frozen=True, tag="dkg.pmsg2"):
    dkg_id: bytes
    pmsg2: bytes


class DkgCoord2(_Msg, frozen=True, tag="dkg.cmsg2"):
    dkg_id: bytes
    cmsg2: bytes


class DkgDone(_Msg, frozen=True, tag="dkg.done"):
    """Participant -> coordinator: the share is stored; the key it belongs to."""

    dkg_id: bytes
    threshold_pubkey: bytes


class DkgFailed(_Msg, frozen=True, tag="dkg.failed"):
    """Either side: the session cannot finish (blames a participant when it can)."""

    dkg_id: bytes
    code: str
    reason: str
    blamed: int = -1


# -- the operator's own requests to its signer --------------------------------------------


class KeygenRequest(_Msg, frozen=True, tag="op.keygen"):
    """Coordinate a DKG among ``members`` (member indices; empty: all of them), each of
    which agreed to it (``AgreeKey``) unless it is the guild's first key."""

    t: int
    members: list[int] = []


class AgreeKey(_Msg, frozen=True, tag="op.agree_key"):
    """This operator agrees that its signer takes part in a new guild key among
    ``members`` (member indices), ``t`` of them signing: a change of the guild's members
    re-makes its key, and a signer takes part in no DKG its own operator did not agree to."""

    members: list[int]
    t: int


class ActivateKey(_Msg, frozen=True, tag="op.activate_key"):
    """Sign with ``key`` from now on, and never again with any key made before it (once
    the guild's funds moved to it)."""

    key: bytes


class SignRequest(_Msg, frozen=True, tag="op.sign"):
    target: SignTarget
    evidence: bytes = b""  # passed to every signer with the target
    key: bytes = b""  # the guild key that signs (33 bytes); empty: the active one


class KeyRequest(_Msg, frozen=True, tag="op.key"):
    """The guild keys this signer holds a share of: the active one
    (``OpReply.threshold_pubkey``) and every one it may sign with (``OpReply.keys``)."""


class KeyInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """A guild key: made among ``members`` (member indices), ``t`` of them signing."""

    key: bytes
    members: list[int]
    t: int


class OpReply(_Msg, frozen=True, tag="op.reply"):
    """Answer to an operator request: a key or a signature, or an error code."""

    ok: bool
    code: str = ""
    error: str = ""
    threshold_pubkey: bytes = b""
    threshold: int = 0  # a key's: how many of the members sign
    signature: bytes = b""
    message: bytes = b""
    sessions: int = 0
    blamed: list[int] = []
    keys: list[KeyInfo] = []  # every key this signer may sign with, oldest first
    agreed: KeyInfo | None = None  # the next key its operator agreed to (``key`` empty)
    first: KeyInfo | None = None  # the first key it held a share of (retired or not)


OpRequest = KeygenRequest | AgreeKey | ActivateKey | SignRequest | KeyRequest

Message = (
    SignStart
    | Presign
    | SignSession
    | Share
    | SignRefused
    | StandingAsk
    | StandingSaid
    | SignDone
    | DkgStart
    | DkgMsg1
    | DkgCoord1
    | DkgMsg2
    | DkgCoord2
    | DkgDone
    | DkgFailed
    | KeygenRequest
    | AgreeKey
    | ActivateKey
    | SignRequest
    | KeyRequest
    | OpReply
)

MAX_MESSAGE_BYTES = 256 * 1024

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


_target_decoder: msgspec.msgpack.Decoder[SignTarget] = msgspec.msgpack.Decoder(SignTarget)


_cert_decoder: msgspec.msgpack.Decoder[list[Standing]] = msgspec.msgpack.Decoder(list[Standing])


def encode_cert(cert: list[Standing]) -> bytes:
    return _encoder.encode(cert)


def decode_cert(data: bytes) -> list[Standing]:
    cert: list[Standing] = _cert_decoder.decode(data)
    return cert


def encode_target(target: SignTarget) -> bytes:
    return _encoder.encode(target)


def decode_target(data: bytes) -> SignTarget:
    target: SignTarget = _target_decoder.decode(data)
    return target


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Message:
    """Decode one message; anything else (unknown kind or field, bad type) is refused."""
    try:
        msg: Message = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise MessageError(f"malformed message: {exc}") from exc
    return msg
