"""Signed, replay-checked messages between guild members over NATS.

Subjects: ``cst.<guild>.signer.<i>`` (member i's signer), ``cst.<guild>.coord.<i>``
(member i's coordinator), ``cst.<guild>.op.<i>`` (member i's operator requests,
request-reply). Every payload is an envelope signed by the sender's host key.
"""

from __future__ import annotations

import os
from enum import StrEnum

from nats.aio.client import Client

from constellation.crypto.dkg import hostpubkey_gen
from constellation.errors import MessageError
from constellation.protocol import signer as proto
from constellation.protocol.envelope import MSG_ID_LEN, Membership, ReplayGuard, seal
from services.runtime import now_ms


class Role(StrEnum):
    SIGNER = "signer"
    COORD = "coord"
    OP = "op"


def subject(guild: str, role: Role, idx: int) -> str:
    return f"cst.{guild}.{role}.{idx}"


class Transport:
    def __init__(
        self,
        nc: Client,
        members: Membership,
        hostseckey: bytes,
        guard: ReplayGuard,
    ) -> None:
        self.nc = nc
        self.members = members
        self.guild = members.guild
        self.hostseckey = hostseckey
        self.hostpubkey = hostpubkey_gen(hostseckey)
        self.guard = guard

    def seal(self, to: bytes, msg: proto.Message) -> bytes:
        return seal(
            self.guild,
            self.hostseckey,
            self.hostpubkey,
            to,
            os.urandom(MSG_ID_LEN),
            now_ms(),
            proto.encode(msg),
        )

    async def send(self, role: Role, idx: int, msg: proto.Message) -> None:
        data = self.seal(self.members.hostpubkeys[idx], msg)
        await self.nc.publish(subject(self.guild, role, idx), data)

    def open(self, data: bytes) -> tuple[int, proto.Message]:
        """Authenticate, replay-check and decode; returns the sender's index."""
        if len(data) > proto.MAX_MESSAGE_BYTES:
            raise MessageError(f"message of {len(data)} bytes is over the limit")
        env, sender = self.members.open(data, self.hostpubkey)
        self.guard.check(env, now_ms())
        return sender, proto.decode(env.body)
