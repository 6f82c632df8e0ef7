"""A real signer process that misbehaves on purpose, for the robustness tests.

``faulty_signer.py bad_psig`` sends partial signatures that do not verify;
``faulty_signer.py slow:<ms>`` holds every partial signature back that long (and so
everything after it). Everything else is the real signer.
"""

from __future__ import annotations

import asyncio
import os
import sys

import msgspec

from constellation.protocol import signer as proto
from services.runtime import run
from services.signer.app import SignerNode
from services.signer.config import Settings
from services.signer.transport import Role

FAULT = sys.argv[1]


class FaultySigner(SignerNode):
    async def send(self, role: Role, idx: int, msg: proto.Message) -> None:
        if isinstance(msg, proto.Share):
            if FAULT == "bad_psig":
                psig = ((int.from_bytes(msg.psig, "big") + 1) % 2**255).to_bytes(32, "big")
                msg = msgspec.structs.replace(msg, psig=psig)
            elif FAULT.startswith("slow:"):
                await asyncio.sleep(int(FAULT[5:]) / 1000)
        await super().send(role, idx, msg)


if __name__ == "__main__":
    settings = Settings.from_env(os.environ)
    sys.exit(run("signer", settings.log_level, lambda: FaultySigner(settings).run))
