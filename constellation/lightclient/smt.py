"""A sparse Merkle tree of coins, keyed by coin id: the light clients' state commitment.

Why this structure: a coin id is a hash, so ids spread evenly over the 256-bit key
space. In a compact sparse Merkle tree (a binary Patricia trie hashed as a Merkle tree) a
subtree holding one leaf *is* that leaf, placed where its id first parts from every
other, so a leaf sits about ``log2(n)`` levels down (18 for 170,000 coins, 20 for a
million). Membership and non-membership are proved alike, by the sibling hashes on the
way down to where the id would be: its leaf (it exists; the leaf says unspent or where it
was spent), an empty subtree, or another leaf sharing the prefix (no such coin). A proof
is ``32 * log2(n)`` bytes plus the leaf, and costs one hash per level to check. A sorted
Merkle list would need two neighbours' paths for non-membership; an accumulator such as
the shard's MuHash proves nothing about one element.

Hashing (tagged SHA-256, so neither can stand for the other or for another protocol's
hash): a leaf is ``H_leaf(coin_id || value)``, a node ``H_node(left || right)`` with an
empty side as 32 zero bytes; an empty tree's root is 32 zero bytes.

The tree is persistent: ``apply`` returns a new root and shares every untouched subtree
with the old one, so the roots of the heights that checkpoints cover stay readable (and
provable) while the ledger moves on, and a root nobody keeps is freed with what only it
held. A batch of changes rebuilds each touched node once.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import NamedTuple

from constellation.hashing import tagged_hasher

EMPTY = bytes(32)
KEY_BITS = 256
_leaf = tagged_hasher("Constellation/coin-leaf")
_node = tagged_hasher("Constellation/coin-node")


def leaf_hash(key: bytes, value: bytes) -> bytes:
    return _leaf(key + value)


def node_hash(left: bytes, right: bytes) -> bytes:
    return _node(left + right)


class Leaf:
    __slots__ = ("hash", "key", "value")
    hash: bytes

    def __init__(self, key: bytes, value: bytes) -> None:
        self.key, self.value = key, value
        self.hash = leaf_hash(key, value)


class Node:
    __slots__ = ("hash", "left", "right")
    hash: bytes

    def __init__(self, left: Tree, right: Tree) -> None:
        self.left, self.right = left, right
        self.hash = node_hash(left.hash if left else EMPTY, right.hash if right else EMPTY)


Tree = Leaf | Node | None


def root_hash(tree: Tree) -> bytes:
    return tree.hash if tree is not None else EMPTY


def bit(key: int, depth: int) -> int:
    return (key >> (KEY_BITS - 1 - depth)) & 1


def apply(tree: Tree, changes: Iterable[tuple[bytes, bytes]]) -> Tree:
    """The tree with each ``(key, value)`` of ``changes`` set (a later change of one key
    wins); ``tree`` itself is unchanged. Keys are 32 bytes."""
    latest = dict(changes)
    if not latest:
        return tree
    keys = sorted(latest)
    ints = [int.from_bytes(k) for k in keys]
    values = [latest[k] for k in keys]
    return _apply(tree, 0, keys, ints, values, 0, len(keys))


def _apply(
    tree: Tree,
    depth: int,
    keys: list[bytes],
    ints: list[int],
    values: list[bytes],
    lo: int,
    hi: int,
) -> Tree:
    """``tree`` (at ``depth``, its keys sharing a prefix of that length with the sorted
    changes ``lo:hi``) with those changes set."""
    if lo == hi:
        return tree
    if tree is None:
        return _build(depth, keys, ints, values, lo, hi)
    if isinstance(tree, Leaf):
        i = bisect_left(keys, tree.key, lo, hi)
        if i == hi or keys[i] != tree.key:  # the old leaf stays, among the changes
            keys = [*keys[lo:i], tree.key, *keys[i:hi]]
            ints = [*ints[lo:i], int.from_bytes(tree.key), *ints[i:hi]]
            values = [*values[lo:i], tree.value, *values[i:hi]]
            lo, hi = 0, len(keys)
        return _build(depth, keys, ints, values, lo, hi)
    mid = _split(depth, ints, lo, hi)
    return Node(
        _apply(tree.left, depth + 1, keys, ints, values, lo, mid),
        _apply(tree.right, depth + 1, keys, ints, values, mid, hi),
    )


def _split(depth: int, ints: list[int], lo: int, hi: int) -> int:
    """The first of the sorted keys ``lo:hi`` (sharing their first ``depth`` bits) whose
    bit ``depth`` is set."""
    shift = KEY_BITS - depth
    prefix = (ints[lo] >> shift) << shift if depth else 0
    return bisect_left(ints, prefix | (1 << (shift - 1)), lo, hi)


def _build(
    depth: int, keys: list[bytes], ints: list[int], values: list[bytes], lo: int, hi: int
) -> Tree:
    if hi - lo == 1:
        return Leaf(keys[lo], values[lo])
    mid = _split(depth, ints, lo, hi)
    left = _build(depth + 1, keys, ints, values, lo, mid) if mid > lo else None
    right = _build(depth + 1, keys, ints, values, mid, hi) if hi > mid else None
    return Node(left, right)


def get(tree: Tree, key: bytes) -> bytes | None:
    """The value of ``key``, or None."""
    k, depth = int.from_bytes(key), 0
    while isinstance(tree, Node):
        tree = tree.right if bit(k, depth) else tree.left
        depth += 1
    return tree.value if tree is not None and tree.key == key else None


class Path(NamedTuple):
    """The way down to where ``key`` is or would be: the siblings from the top, and what
    is there (``leaf_key``/``leaf_value``: a leaf, empty bytes for an empty subtree)."""

    siblings: list[bytes]
    leaf_key: bytes
    leaf_value: bytes


def prove(tree: Tree, key: bytes) -> Path:
    k, depth, siblings = int.from_bytes(key), 0, []
    while isinstance(tree, Node):
        if bit(k, depth):
            siblings.append(root_hash(tree.left))
            tree = tree.right
        else:
            siblings.append(root_hash(tree.right))
            tree = tree.left
        depth += 1
    if tree is None:
        return Path(siblings, b"", b"")
    return Path(siblings, tree.key, tree.value)


def path_root(key: bytes, path: Path) -> bytes:
    """The root that ``path`` leads to from ``key``'s place. The caller checks that a leaf
    it shows for another key shares the path's prefix with ``key`` (``shares_prefix``)."""
    k = int.from_bytes(key)
    h = leaf_hash(path.leaf_key, path.leaf_value) if path.leaf_key else EMPTY
    for depth in range(len(path.siblings) - 1, -1, -1):
        sibling = path.siblings[depth]
        h = node_hash(sibling, h) if bit(k, depth) else node_hash(h, sibling)
    return h


def shares_prefix(a: bytes, b: bytes, depth: int) -> bool:
    shift = KEY_BITS - depth
    return int.from_bytes(a) >> shift == int.from_bytes(b) >> shift
