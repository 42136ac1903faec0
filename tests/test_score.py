"""E2E file readers, the file-level scorer and the report format (Java not needed)."""

from __future__ import annotations

import json

import pytest

from splitcom.errors import UserError
from splitcom.evaluate import score as score_mod
from splitcom.evaluate.score import format_scores, read_hyps, read_refs, score_command, score_files


def write(tmp_path, name, text, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def test_read_refs_multi_reference_format(tmp_path):
    path = write(tmp_path, "refs.txt", "A one.\n  A two.  \n\nB one.\n\nC one.\nC two.\nC three.\n\n")
    assert read_refs(path) == [["A one.", "A two."], ["B one."], ["C one.", "C two.", "C three."]]


def test_read_refs_tolerates_bom_crlf_leading_and_repeated_blank_lines(tmp_path):
    path = write(tmp_path, "refs.txt", "\ufeff\r\nA one.\r\nA two.\r\n\r\n\r\n\r\nB one.\r\n", encoding="utf-8")
    assert read_refs(path) == [["A one.", "A two."], ["B one."]]


def test_read_refs_without_blank_lines_is_single_reference(tmp_path):
    path = write(tmp_path, "refs.txt", "first\nsecond\nthird\n")
    assert read_refs(path) == [["first"], ["second"], ["third"]]


def test_read_hyps_one_per_line_keeps_empty_outputs(tmp_path):
    path = write(tmp_path, "hyps.txt", "one\n\n three \n")
    assert read_hyps(path) == ["one", "", "three"]


@pytest.mark.parametrize("reader", [read_refs, read_hyps])
def test_empty_file_is_a_user_error(tmp_path, reader):
    path = write(tmp_path, "empty.txt", "")
    with pytest.raises(UserError, match="empty") as info:
        reader(path)
    assert str(path) in str(info.value)


def test_blank_only_reference_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="only blank lines"):
        read_refs(write(tmp_path, "refs.txt", "\n\n  \n"))


def test_missing_and_undecodable_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_hyps(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="not a file"):
        read_refs(tmp_path)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not valid UTF-8"):
        read_hyps(bad)


def test_count_mismatch_names_both_files_and_counts(tmp_path):
    refs = write(tmp_path, "refs.txt", "a\nb\n\nc\n")
    hyps = write(tmp_path, "hyps.txt", "a\nb\nc\n")
    with pytest.raises(UserError) as info:
        score_files(refs, hyps, use_java=False)
    msg = str(info.value)
    assert "3 hypotheses" in msg and "2 reference groups" in msg
    assert str(refs) in msg and str(hyps) in msg


def test_score_files_end_to_end(tmp_path):
    refs = write(tmp_path, "refs.txt", "the cat sat on the mat\nthe cat is on the mat\n\na dog barks loudly\n")
    hyps = write(tmp_path, "hyps.txt", "the cat sat on the mat\na dog barks loudly\n")
    got = score_files(refs, hyps, use_java=False)
    assert got["BLEU"] == pytest.approx(1.0)
    assert got["ROUGE_L"] == pytest.approx(1.0)
    assert got["METEOR"] is None and got["warnings"]


def test_format_scores_like_official_script():
    text = format_scores({"BLEU": 0.69254, "NIST": 8.47806, "METEOR": 0.47031, "ROUGE_L": 0.72084,
                          "CIDEr": 2.39748, "warnings": []})
    assert text.splitlines() == ["SCORES:", "==============", "BLEU: 0.6925", "NIST: 8.4781",
                                 "METEOR: 0.4703", "ROUGE_L: 0.7208", "CIDEr: 2.3975"]


def test_format_scores_missing_meteor_shows_na_and_warning():
    text = format_scores({"BLEU": 1.0, "NIST": 2.0, "METEOR": None, "ROUGE_L": 1.0, "CIDEr": 0.0,
                          "warnings": ["METEOR not computed (no java)"]})
    assert "METEOR: n/a" in text.splitlines()
    assert text.splitlines()[-1] == "warning: METEOR not computed (no java)"


def test_score_command_json_and_text(tmp_path, monkeypatch):
    refs = write(tmp_path, "refs.txt", "a b c d\n\ne f g h\n")
    hyps = write(tmp_path, "hyps.txt", "a b c d\ne f g h\n")
    real = score_mod.compute_metrics
    monkeypatch.setattr(score_mod, "compute_metrics", lambda h, r, use_java=True: real(h, r, use_java=False))
    data = json.loads(score_command(refs, hyps, as_json=True))
    assert data["BLEU"] == pytest.approx(1.0) and data["METEOR"] is None
    assert score_command(refs, hyps).startswith("SCORES:\n==============\nBLEU: 1.0000\n")
