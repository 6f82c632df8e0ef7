"""An operator's requests to its own signer (keygen, sign), signed with its identity."""

from __future__ import annotations

from types import TracebackType

from nats.aio.client import Client

from constellation.crypto.dkg import hostpubkey_gen
from constellation.errors import MessageError
from constellation.protocol import signer as proto
from constellation.protocol.envelope import Membership
from services.runtime import close_nats, connect_nats
from services.signer.transport import Role, Transport, subject


class SignerClient:
    """``async with SignerClient(...) as c: await c.request(...)`` over one connection."""

    def __init__(self, nats_url: str, members: Membership, hostseckey: bytes) -> None:
        self.nats_url = nats_url
        self.members = members
        self.hostseckey = hostseckey
        self.hostpubkey = hostpubkey_gen(hostseckey)
        self.me = members.index[self.hostpubkey]
        self._nc: Client | None = None
        self._transport: Transport | None = None

    async def __aenter__(self) -> SignerClient:
        name = f"signer-client-{self.me}"
        self._nc = await connect_nats(self.nats_url, name, connect_timeout=5)
        self._transport = Transport(self._nc, self.members, self.hostseckey)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._nc is not None:
            await close_nats(self._nc)

    async def request(self, request: proto.OpRequest, timeout_s: float) -> proto.OpReply:
        """Send ``request`` to this operator's signer and return its authenticated reply."""
        assert self._nc is not None and self._transport is not None, "use `async with`"
        msg = await self._nc.request(
            subject(self.members.guild, Role.OP, self.me),
            self._transport.seal(self.hostpubkey, request),
            timeout=timeout_s,
        )
        sender, reply = self._transport.open(msg.data)
        if sender != self.me or not isinstance(reply, proto.OpReply):
            raise MessageError("the reply did not come from this operator's signer")
        return reply


async def call(
    nats_url: str,
    members: Membership,
    hostseckey: bytes,
    request: proto.OpRequest,
    timeout_s: float,
) -> proto.OpReply:
    """One request over a connection of its own."""
    async with SignerClient(nats_url, members, hostseckey) as client:
        return await client.request(request, timeout_s)
