"""WebNLG 2017 and DART loaders on hand-written fixtures, plus counts on the real files when present."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED

from splitcom.data import dart, load_dataset, webnlg
from splitcom.errors import UserError

WEBNLG_DIR = SHARED / "data" / "webnlg2017"
DART_DIR = SHARED / "data" / "dart"
requires_webnlg = pytest.mark.skipif(not (WEBNLG_DIR / "dev").is_dir(),
                                     reason=f"real WebNLG data not at {WEBNLG_DIR} (../shared is absent)")
requires_dart = pytest.mark.skipif(not (DART_DIR / "dart-v1.1.1-full-dev.json").is_file(),
                                   reason=f"real DART data not found at {DART_DIR} (../shared is absent)")

TRAIN_1 = """<?xml version="1.0" ?>
<benchmark><entries>
  <entry category="Airport" eid="Id1" size="1">
    <originaltripleset>
      <otriple>Aarhus_Airport | cityServed | "Aarhus, Denmark"@en</otriple>
    </originaltripleset>
    <modifiedtripleset><mtriple>Aarhus_Airport | cityServed | "Aarhus, Denmark"</mtriple></modifiedtripleset>
    <lex comment="good" lid="Id1">The Aarhus is the airport of Aarhus, Denmark.</lex>
    <lex comment="good" lid="Id2">Aarhus Airport serves the city of
        Aarhus, Denmark.</lex>
  </entry>
  <entry category="Airport" eid="Id2" size="1">
    <modifiedtripleset>
      <mtriple>Aarhus_Airport | elevationAboveTheSeaLevel_(in_metres) | 25.0</mtriple>
    </modifiedtripleset>
    <lex comment="good" lid="Id1">Aarhus Airport is 25 metres above sea level.</lex>
  </entry>
</entries></benchmark>
"""

TRAIN_2 = """<benchmark><entries>
  <entry category="Food" eid="Id1" size="2">
    <modifiedtripleset>
      <mtriple>Bakso | country | Indonesia</mtriple>
      <mtriple>Indonesia | leaderName | Joko_Widodo</mtriple>
    </modifiedtripleset>
    <lex comment="good" lid="Id1">Bakso comes from Indonesia, led by Joko Widodo.</lex>
  </entry>
</entries></benchmark>
"""

# WebNLG 3.0 nests the text of a lexicalisation; the loader reads both layouts.
DEV_1 = """<benchmark><entries>
  <entry category="Airport" eid="Id7" size="1">
    <modifiedtripleset><mtriple>Agra_Airport | location | India</mtriple></modifiedtripleset>
    <lex comment="good" lid="Id1"><sortedtripleset><sentence ID="1"/></sortedtripleset>
      <text>Agra Airport is in India.</text><template>AGENT-1 is in PATIENT-1.</template></lex>
    <lex comment="good" lid="Id2">Agra airport is located in India.</lex>
  </entry>
</entries></benchmark>
"""


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def webnlg_dir(tmp_path):
    write(tmp_path / "train" / "1triples" / "1triple_Airport_train.xml", TRAIN_1)
    write(tmp_path / "train" / "2triples" / "2triples_Food_train.xml", TRAIN_2)
    write(tmp_path / "dev" / "1triples" / "1triple_Airport_dev.xml", DEV_1)
    return tmp_path


def test_webnlg_one_example_per_lex_grouped_by_entry(webnlg_dir):
    train = webnlg.load_split(webnlg_dir, "train")
    assert [e.group for e in train] == ["Airport/1/Id1", "Airport/1/Id1", "Airport/1/Id2", "Food/2/Id1"]
    assert train[0].prompt == 'Aarhus Airport | cityServed | "Aarhus, Denmark"'
    assert train[1].completion == "Aarhus Airport serves the city of Aarhus, Denmark."  # whitespace collapsed
    assert train[2].prompt == "Aarhus Airport | elevationAboveTheSeaLevel (in metres) | 25.0"
    assert train[3].prompt == "Bakso | country | Indonesia ; Indonesia | leaderName | Joko Widodo"
    assert train[3].attrs == {"category": "Food", "size": "2", "eid": "Id1"}
    dev = webnlg.load_split(webnlg_dir, "dev")
    assert [e.completion for e in dev] == ["Agra Airport is in India.", "Agra airport is located in India."]


def test_webnlg_registered_in_loaders(webnlg_dir):
    train, val = load_dataset(f"webnlg:{webnlg_dir}")
    assert (len(train), len(val)) == (4, 2)
    assert val[0].group == "Airport/1/Id7"


@pytest.mark.parametrize("case, text, needle", [
    ("broken xml", "<benchmark><entries><entry>", "not valid XML"),
    ("no lex", "<benchmark><entry eid='Id1'><modifiedtripleset><mtriple>a | b | c</mtriple>"
               "</modifiedtripleset></entry></benchmark>", "no <lex>"),
    ("bad triple", "<benchmark><entry eid='Id1'><modifiedtripleset><mtriple>a | b</mtriple>"
                   "</modifiedtripleset><lex>x</lex></entry></benchmark>", "subject | property | object"),
    ("no triples", "<benchmark><entry eid='Id1'><lex>x</lex></entry></benchmark>", "mtriple"),
])
def test_webnlg_bad_files_name_the_file(tmp_path, case, text, needle):
    path = write(tmp_path / "dev" / "1triples" / "bad.xml", text)
    with pytest.raises(UserError, match=needle) as err:
        webnlg.load_split(tmp_path, "dev")
    assert str(path) in str(err.value)


def test_webnlg_missing_split_and_duplicate_entries(webnlg_dir, tmp_path):
    with pytest.raises(UserError, match="WebNLG dev folder not found"):
        webnlg.load_split(webnlg_dir / "train", "dev")
    write(webnlg_dir / "dev" / "1triples" / "copy.xml", DEV_1)
    with pytest.raises(UserError, match="also appears"):
        webnlg.load_split(webnlg_dir, "dev")
    with pytest.raises(UserError, match="needs a directory"):
        load_dataset("webnlg")


MARS = [["Mars Hill College", "JOINED", "1973"], ["Mars Hill College", "LOCATION", "Mars Hill,  NC"]]
DART_DEV = [
    {"tripleset": MARS,
     "subtree_was_extended": True,
     "annotations": [{"source": "WikiSQL_decl_sents", "text": "A school from Mars Hill, NC, joined in 1973."},
                     {"source": "WikiSQL_decl_sents", "text": "Mars Hill College joined in 1973."}]},
    {"tripleset": [["[TABLECONTEXT]", "[TITLE]", "Eagles"]], "subtree_was_extended": False,
     "annotations": [{"source": "e2e", "text": "Eagles."}]},
    # Same triple set as the first entry: a separate input all the same (its own group).
    {"tripleset": MARS,
     "annotations": [{"source": "webnlg", "text": "It joined in 1973."}]},
]


def test_dart_dev_examples_and_groups(tmp_path):
    (tmp_path / "dart-v1.1.1-full-dev.json").write_text(json.dumps(DART_DEV), encoding="utf-8")
    dev = dart.load_split(tmp_path, "dev")
    assert [e.group for e in dev] == ["dev/0", "dev/0", "dev/1", "dev/2"]
    assert dev[0].prompt == "Mars Hill College | JOINED | 1973 ; Mars Hill College | LOCATION | Mars Hill, NC"
    assert dev[2].prompt == "[TABLECONTEXT] | [TITLE] | Eagles"
    assert dev[1].completion == "Mars Hill College joined in 1973."
    assert dev[2].attrs == {"source": "e2e", "size": "1"}


def test_dart_training_needs_a_train_file(tmp_path):
    (tmp_path / "dart-v1.1.1-full-dev.json").write_text(json.dumps(DART_DEV), encoding="utf-8")
    with pytest.raises(UserError, match="DART train file not found.*not allowed.*--dataset dart:DIR"):
        load_dataset(f"dart:{tmp_path}")
    (tmp_path / "dart-v1.1.1-full-train.json").write_text(json.dumps(DART_DEV[:2]), encoding="utf-8")
    train, val = load_dataset(f"dart:{tmp_path}")
    assert (len(train), len(val)) == (3, 4)


@pytest.mark.parametrize("data, needle", [
    ("[{", "not valid JSON"),
    ('{"a": 1}', "list of entries"),
    ('[{"tripleset": [], "annotations": [{"text": "x"}]}]', "empty 'tripleset'"),
    ('[{"tripleset": [["a", "b"]], "annotations": [{"text": "x"}]}]', "not \\[subject, property, object\\]"),
    ('[{"tripleset": [["a", "b", "c"]], "annotations": []}]', "annotations"),
    ('[{"tripleset": [["a", "b", "c"]], "annotations": [{"text": " "}]}]', "no 'text'"),
])
def test_dart_bad_files(tmp_path, data, needle):
    (tmp_path / "dart-v1.1.1-full-dev.json").write_text(data, encoding="utf-8")
    with pytest.raises(UserError, match=needle):
        dart.load_split(tmp_path, "dev")


def test_dart_ambiguous_or_missing(tmp_path):
    with pytest.raises(UserError, match="DART dev file not found"):
        dart.load_split(tmp_path, "dev")
    for version in ("1.0.0", "1.1.1"):
        (tmp_path / f"dart-v{version}-full-dev.json").write_text("[]", encoding="utf-8")
    with pytest.raises(UserError, match="several DART dev files"):
        dart.load_split(tmp_path, "dev")


@requires_webnlg
def test_real_webnlg_counts():
    """The counts of shared/data/webnlg2017/SOURCE.md: entries and lexicalisations per split."""
    train, dev = load_dataset(f"webnlg:{WEBNLG_DIR}")
    assert (len({e.group for e in train}), len(train)) == (6940, 18102)
    assert (len({e.group for e in dev}), len(dev)) == (872, 2268)
    assert {e.attrs["size"] for e in dev} == {str(n) for n in range(1, 8)}


@requires_dart
def test_real_dart_counts():
    dev = dart.load_split(DART_DIR, "dev")
    assert (len({e.group for e in dev}), len(dev)) == (2768, 6980)
    with pytest.raises(UserError, match="train"):
        load_dataset(f"dart:{DART_DIR}")
