"""Section 2: units, ids, normalisation, views and vocabulary building."""
import json
import unicodedata

import pytest

from conftest import ROOT, m

FATHA, SHADDA = "\u064e", "\u0651"
# Written with escapes: an editor or terminal that normalises to NFC would silently reorder these marks.
INNA = "\u0625\u0650\u0646" + SHADDA + FATHA  # the seed's spelling of "inna": shadda before fatha
QALA = "\u0642\u064e\u0627\u0644\u064e"


def test_vocab_json_holds_the_seed_units_with_the_seed_ids():
    saved = json.loads((ROOT / "vocab.json").read_text(encoding="utf-8"))
    assert len(m.SEED_UNITS) == 226
    assert saved["units"] == {u: i + 1 for i, u in enumerate(m.SEED_UNITS)}
    assert saved["units"]["ٱ"] == 1 and saved["units"]["ءً"] == 226 and saved["units"]["يّْ"] == 3
    special_ids = set(saved["specials"].values())
    assert special_ids.isdisjoint(range(1, 227)) and len(special_ids) == 4
    assert saved["specials"]["<blank>"] == 0
    assert m.Vocabulary.load(ROOT / "vocab.json").ids == m.Vocabulary.seed().ids


def test_the_built_in_units_are_spelled_shadda_first():
    assert all(m.normalize_unit(u) == u for u in m.SEED_UNITS)
    assert m.SEED_UNITS[2] == "\u064a" + SHADDA + "\u0652"


def test_marks_in_canonical_order_map_to_the_same_unit():
    vocab = m.Vocabulary.seed()
    seed_order = INNA
    canonical = unicodedata.normalize("NFC", seed_order)
    assert canonical != seed_order  # Unicode puts the vowel first
    assert vocab.encode(canonical)[0] == vocab.encode(seed_order)[0] == [215, 32]
    assert vocab.decode(vocab.encode(canonical)[0]) == seed_order


def test_tatweel_and_stray_whitespace_are_dropped():
    vocab = m.Vocabulary.seed()
    clean = f"{QALA} {INNA}"
    messy = f"  {QALA[:2]}\u0640{QALA[2:]} \t\n {INNA}\u0640  "
    assert vocab.encode(messy) == vocab.encode(clean)
    assert vocab.decode(vocab.encode(messy)[0]) == clean


def test_round_trip_of_generated_labels_and_word_boundaries():
    vocab = m.Vocabulary.seed()
    for _, text, _, _ in m.synthesize_dataset(m.Config(synthetic_clips=50), vocab):
        ids, unknown = vocab.encode(text)
        assert not unknown and vocab.decode(ids) == text
        assert ids.count(vocab.space) == len(text.split()) - 1
        without, _ = vocab.encode(text, word_boundary=False)
        assert vocab.space not in without and without == [i for i in ids if i != vocab.space]


def test_unknown_units_are_reported_and_mapped_to_unk():
    vocab = m.Vocabulary.seed()
    ids, unknown = vocab.encode("قَالَ xyz")
    assert unknown == ["x", "y", "z"] and ids[-3:] == [vocab.unk] * 3


def test_letters_only_view_has_the_37_base_letters():
    letters = m.Vocabulary.seed().view("letters")
    assert len(letters.ids) == 37 and letters.letters_only
    ids, unknown = letters.encode(f"{QALA} {INNA}")
    assert not unknown and letters.decode(ids) == "قال إن"
    assert len(set(letters.specials.values()) | set(letters.ids.values())) == letters.size


def test_vocab_mode_keeps_known_ids_and_appends_new_units(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "a.csv").write_text("word\nقَالَ\nbonjour\n", encoding="utf-8")
    (labels / "b.csv").write_text("text\n\u0642\u0650\u0637" + SHADDA + " \u00e9\n", encoding="utf-8")
    cfg = m.Config(mode="vocab", data_dir=str(labels), work_dir=str(tmp_path / "work"))
    vocab = m.run_vocab(cfg)
    seed = m.Vocabulary.seed()
    assert all(vocab.ids[u] == i for u, i in seed.ids.items())
    new = {u: i for u, i in vocab.ids.items() if u not in seed.ids}
    assert set(new) == set("bonjur") | {"\u0637" + SHADDA, "\u00e9"}
    assert min(new.values()) == 230 and sorted(new.values()) == list(range(230, 230 + len(new)))
    reloaded = m.Vocabulary.load(tmp_path / "work" / "vocab.json")
    assert reloaded.ids == vocab.ids and reloaded.encode("bonjour")[1] == []


def test_a_broken_vocabulary_file_is_a_clear_error(tmp_path):
    path = tmp_path / "v.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(m.UserError, match="--mode vocab"):
        m.Vocabulary.load(path)
