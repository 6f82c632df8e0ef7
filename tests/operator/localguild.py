"""The documents an operator of a local guild (``services.devnet``) would apply: its
Secrets and its Guild, for the operator's tests against the emulator and real machines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from constellation.keys import SigningKey
from services.devnet import Devnet, guild
from services.operator.render import NATS_SELF
from services.signer.config import load_members
from tests.operator.conftest import NS


def op0(where: Path) -> Devnet:
    return guild.load(where)[0]


def documents(where: Path) -> list[dict[str, Any]]:
    """op0's Secrets and Guild, as its operator would write them for the local guild."""
    nets = guild.load(where)
    net = nets[0]
    signers = load_members(net.members_path).hostpubkeys
    members = [
        {
            "name": n.operator,
            "key": SigningKey(bytes.fromhex(n.operator_key)).pubkey.hex(),
            "signerKey": signers[i].hex(),
            "issuers": [n.issuer.pubkey.hex()],
            "nats": f"nats://127.0.0.1:{n.nats_port}",
            "machines": 2,
        }
        for i, n in enumerate(nets)
    ]
    peers = json.loads(net.peers_path.read_text())

    def secret(name: str, data: dict[str, str]) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": NS},
            "type": "Opaque",
            "stringData": data,
        }

    return [
        secret("op0-keys", {"operator-key": net.operator_key, "issuer-key": net.issuer_secret}),
        secret("op0-peers", {"peers.json": json.dumps(peers)}),
        # what the operator would generate, as the local guild made it
        secret("g1-generated", {NATS_SELF: net.nats_password}),
        {
            "apiVersion": "constellation.dev/v1alpha1",
            "kind": "Guild",
            "metadata": {"name": "g1", "namespace": NS},
            "spec": {
                "guild": net.guild,
                "operator": "op0",
                "threshold": 2,
                "shards": net.shards,
                "network": "regtest",
                "secrets": {"keys": "op0-keys", "peers": "op0-peers"},
                "members": members,
                "mint": False,
            },
        },
    ]
