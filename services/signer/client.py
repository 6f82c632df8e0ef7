"""An operator's requests to its own signer (keygen, sign), signed with its identity."""

from __future__ import annotations

import nats

from constellation.crypto.dkg import hostpubkey_gen
from constellation.errors import MessageError
from constellation.protocol import signer as proto
from constellation.protocol.envelope import Membership, ReplayGuard
from services.signer.transport import Role, Transport, subject


async def call(
    nats_url: str,
    members: Membership,
    hostseckey: bytes,
    request: proto.KeygenRequest | proto.SignRequest,
    timeout_s: float,
) -> proto.OpReply:
    """Send ``request`` to this operator's signer and return its authenticated reply."""
    hostpubkey = hostpubkey_gen(hostseckey)
    me = members.index[hostpubkey]
    nc = await nats.connect(nats_url, connect_timeout=5)
    try:
        transport = Transport(nc, members, hostseckey, hostpubkey, ReplayGuard())
        msg = await nc.request(
            subject(members.guild, Role.OP, me),
            transport.seal(hostpubkey, request),
            timeout=timeout_s,
        )
        sender, reply = transport.open(msg.data)
    finally:
        await nc.close()
    if sender != me or not isinstance(reply, proto.OpReply):
        raise MessageError("the reply did not come from this operator's signer")
    return reply
