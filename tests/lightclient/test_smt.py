"""The coin tree: a model-checked map whose proofs show membership and non-membership,
whose old roots stay as they were, and whose shape does not depend on the order of
changes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from constellation.lightclient import smt

keys = st.binary(min_size=32, max_size=32)
# Keys sharing long prefixes, so that subtrees with one empty side are exercised.
close_keys = st.builds(
    lambda b, n: bytes(31) + bytes([b >> n << n]), st.integers(0, 255), st.integers(0, 7)
)
values = st.binary(min_size=1, max_size=8)
changes = st.lists(st.tuples(st.one_of(keys, close_keys), values), max_size=30)


@given(st.lists(changes, max_size=5), st.one_of(keys, close_keys))
def test_the_tree_is_the_map_of_its_changes(
    batches: list[list[tuple[bytes, bytes]]], probe: bytes
) -> None:
    tree: smt.Tree = None
    model: dict[bytes, bytes] = {}
    roots = []
    for batch in batches:
        before = smt.root_hash(tree)
        old = tree
        tree = smt.apply(tree, batch)
        model.update(batch)
        assert smt.root_hash(old) == before  # persistent: the old version is unchanged
        roots.append(smt.root_hash(tree))
    for key, value in model.items():
        assert smt.get(tree, key) == value
        path = smt.prove(tree, key)
        assert path.leaf_key == key and path.leaf_value == value
        assert smt.path_root(key, path) == smt.root_hash(tree)
    # In one batch, in any order: the same root (one tree per set of leaves).
    assert smt.root_hash(smt.apply(None, sorted(model.items(), reverse=True))) == smt.root_hash(
        tree
    )
    path = smt.prove(tree, probe)
    assert smt.path_root(probe, path) == smt.root_hash(tree)
    if probe not in model:
        assert smt.get(tree, probe) is None
        assert path.leaf_key != probe
        if path.leaf_key:
            assert smt.shares_prefix(path.leaf_key, probe, len(path.siblings))


@given(
    st.lists(st.tuples(keys, values), min_size=2, max_size=30, unique_by=lambda kv: kv[0]),
    st.data(),
)
def test_a_tampered_path_leads_elsewhere(
    items: list[tuple[bytes, bytes]], data: st.DataObject
) -> None:
    tree = smt.apply(None, items)
    key, value = dict(items).popitem()
    path = smt.prove(tree, key)
    root = smt.root_hash(tree)
    assert smt.path_root(key, path._replace(leaf_value=value + b"!")) != root
    i = data.draw(st.integers(0, len(path.siblings) - 1))
    bent = list(path.siblings)
    bent[i] = bytes(32) if bent[i] != bytes(32) else b"\x01" * 32
    assert smt.path_root(key, path._replace(siblings=bent)) != root
    assert smt.path_root(key, path._replace(siblings=path.siblings[1:])) != root


def test_an_empty_tree_proves_every_absence() -> None:
    path = smt.prove(None, b"\x07" * 32)
    assert path == smt.Path([], b"", b"")
    assert smt.path_root(b"\x07" * 32, path) == smt.EMPTY == smt.root_hash(None)
