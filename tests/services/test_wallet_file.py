"""The wallet file's ecash secrets: derived from its words (NUT-13), each keyset's
counter kept in the file, so that no output is made twice and a wallet restored from
the words makes the same outputs again."""

from __future__ import annotations

from pathlib import Path

from constellation.ecash.client import derived_outputs
from constellation.wallet import new_mnemonic, seed_of
from services.wallet import WalletFile

KEYSET = "01" + "5b" * 32
OTHER = "00" + "9a1f293253e41e"


def test_outputs_come_from_the_words_and_a_counter_the_file_keeps(tmp_path: Path) -> None:
    words = new_mnemonic()
    doc = WalletFile.create(tmp_path / "w.json", "http://gw", "regtest", words)
    first, _ = doc.outputs([1, 2, 4], KEYSET)
    doc.save(tmp_path / "w.json")
    doc = WalletFile.load(tmp_path / "w.json")
    assert doc.counters == {KEYSET: 3}
    second, secrets = doc.outputs([8], KEYSET)
    other, _ = doc.outputs([8], OTHER)  # each keyset counts on its own
    assert doc.counters == {KEYSET: 4, OTHER: 1}
    assert len({o.B_ for o in [*first, *second, *other]}) == 5  # none made twice
    # the same words make the same outputs: what a restore asks the mint about
    again, same = derived_outputs([1, 2, 4, 8], KEYSET, seed_of(words), 0)
    assert [o.B_ for o in again] == [o.B_ for o in [*first, *second]]
    assert same[3] == secrets[0]
