"""An operator's requests to its own signer (keygen, sign, keys), signed with one of
its client keys: a key that may ask the signer, not the signer's identity (which, with
the recovery data beside it, would restore the signer's share)."""

from __future__ import annotations

from types import TracebackType

from nats.aio.client import Client

from constellation.errors import MessageError
from constellation.protocol import signer as proto
from services.runtime import close_nats, connect_nats
from services.signer.config import SignerAccess
from services.signer.transport import ClientTransport, Role, subject


class SignerClient:
    """``async with SignerClient(access) as c: await c.request(...)`` over one
    connection, tried ``attempts`` times (-1: for ever, for a client the process holds
    for its life; a short session gives up, NATS's NoServersError, and is asked again
    later, rather than waiting on a NATS server that is down)."""

    def __init__(self, access: SignerAccess, attempts: int = -1) -> None:
        self.access = access
        self.attempts = attempts
        self.transport = ClientTransport(access.members, access.signer, access.client_key)
        self._nc: Client | None = None

    async def __aenter__(self) -> SignerClient:
        name = f"signer-client-{self.transport.me}"
        self._nc = await connect_nats(
            self.access.nats_url, name, connect_timeout=5, max_reconnect_attempts=self.attempts
        )
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
        assert self._nc is not None, "use `async with`"
        msg = await self._nc.request(
            subject(self.access.members.guild, Role.OP, self.transport.me),
            self.transport.seal(request),
            timeout=timeout_s,
        )
        reply = self.transport.open(msg.data)
        if not isinstance(reply, proto.OpReply):
            raise MessageError("the signer's reply is not a reply")
        return reply


async def call(
    access: SignerAccess, request: proto.OpRequest, timeout_s: float, attempts: int = -1
) -> proto.OpReply:
    """One request over a connection of its own (``SignerClient``'s ``attempts``)."""
    async with SignerClient(access, attempts) as client:
        return await client.request(request, timeout_s)
