"""The RFC 9162 Merkle tree: the Certificate Transparency reference roots, and audit
paths that verify exactly for their own leaf, index and size."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from constellation.lightclient import merkle

# transparency-dev/merkle testonly: the leaves of the reference tree and the roots of its
# first n leaves (n = 0..8).
LEAVES = [b"", b"\x00", b"\x10", b"\x20\x21", b"\x30\x31", b"\x40\x41\x42\x43"]
LEAVES += [bytes(range(0x50, 0x58)), bytes(range(0x60, 0x70))]
ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
# Its audit path of leaf 0 in the tree of 8.
PATH_0_OF_8 = [
    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
]


def test_the_reference_roots() -> None:
    for n, root in enumerate(ROOTS):
        assert merkle.MerkleTree(LEAVES[:n]).root().hex() == root


def test_the_reference_path() -> None:
    tree = merkle.MerkleTree(LEAVES)
    assert [h.hex() for h in tree.path(0)] == PATH_0_OF_8
    assert merkle.verify_path(LEAVES[0], 0, 8, tree.path(0), tree.root())


@given(st.lists(st.binary(max_size=8), min_size=1, max_size=40), st.data())
def test_every_path_verifies_for_its_leaf_only(leaves: list[bytes], data: st.DataObject) -> None:
    tree = merkle.MerkleTree(leaves)
    n, root = len(leaves), tree.root()
    i = data.draw(st.integers(0, n - 1))
    path = tree.path(i)
    assert merkle.verify_path(leaves[i], i, n, path, root)
    assert not merkle.verify_path(leaves[i] + b"!", i, n, path, root)
    assert not merkle.verify_path(leaves[i], i, n, path, bytes(32))
    if path:
        bent = [*path[:-1], bytes(32)]
        assert not merkle.verify_path(leaves[i], i, n, bent, root)
        assert not merkle.verify_path(leaves[i], i, n, path[:-1], root)
    for j in (i - 1, i + 1):
        if 0 <= j < n and leaves[j] != leaves[i]:
            assert not merkle.verify_path(leaves[i], j, n, path, root)
    assert not merkle.verify_path(leaves[i], n, n, path, root)


def test_an_inner_node_does_not_pass_for_a_leaf() -> None:
    tree = merkle.MerkleTree(LEAVES[:4])
    inner = tree.levels[1][0]  # the node over leaves 0 and 1
    assert not merkle.verify_path(inner, 0, 2, [tree.levels[1][1]], tree.root())
