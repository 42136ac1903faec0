"""E2E metrics on hand-made cases whose values are worked out by hand from the published definitions.

Java-dependent checks (Stanford PTB tokeniser, METEOR 1.5) are skipped when ``java`` is missing;
the METEOR JVM is started once for the whole module (it takes ~8 s to load its paraphrase table).
"""

from __future__ import annotations

import math
import os
import shutil
import stat
import sys

import pytest
import sacrebleu
from conftest import bench_module

from splitcom.evaluate import metrics
from splitcom.evaluate.metrics import (
    compute_metrics,
    corpus_bleu,
    meteor_score,
    ptb_tokenize_approx,
    ptb_tokenize_java,
)
from splitcom.evaluate.nist import NIST_BETA, corpus_nist, mteval_tokenize, nist_length_penalty

JAVA = shutil.which("java")
needs_java = pytest.mark.skipif(JAVA is None, reason="java not on PATH: METEOR and the Stanford PTB tokeniser need it")


def bleu(hyps, refs):
    return corpus_bleu([mteval_tokenize(h) for h in hyps], [[mteval_tokenize(r) for r in g] for g in refs])


def nist(hyps, refs):
    return corpus_nist([mteval_tokenize(h) for h in hyps], [[mteval_tokenize(r) for r in g] for g in refs])


# ---------------------------------------------------------------- tokenisation (mteval-v13a)


def test_mteval_tokenisation_splits_punctuation_and_folds_ascii_case_only():
    got = mteval_tokenize("The  Eagle's £20-25, near U.S. &amp; Café.\n ÉCOLE")
    assert got == ["the", "eagle's", "£20", "-", "25", ",", "near", "u", ".", "s", ".", "&", "café", ".", "École"]


# ---------------------------------------------------------------- BLEU


def test_bleu_is_one_for_identical_text_regardless_of_case_and_spacing():
    assert bleu(["The cat sat on the mat."], [["the cat  sat on the MAT ."]]) == pytest.approx(1.0)


def test_bleu_hand_computed_with_brevity_penalty():
    # hyp 6 tokens, ref 8; clipped matches 1-gram 6/6, 2-gram 4/5, 3-gram 3/4, 4-gram 2/3
    expected = math.exp(1 - 8 / 6) * (6 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert bleu(["the cat sat on the mat"], [["the cat sat on the red mat today"]]) == pytest.approx(expected)
    assert expected == pytest.approx(0.569836, abs=1e-6)


def test_bleu_hand_computed_with_mteval_smoothing_of_a_zero_count():
    # matches 5/6, 3/5, 1/4, 0/3 -> the zero 4-gram count becomes 1 / (2 * 3)
    expected = (5 / 6 * 3 / 5 * 1 / 4 * 1 / (2 * 3)) ** 0.25
    assert bleu(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(expected)


def test_bleu_closest_reference_length_ties_go_to_the_shorter_reference():
    # hyp has 6 tokens; refs have 5 and 7 (both 1 away): mteval takes 5, so no brevity penalty.
    # Were 7 used, BLEU would carry exp(1 - 7/6) ~ 0.85.
    hyp = "a b c d e f"
    assert bleu([hyp], [["a b c d e f g", "a b c d e"]]) == pytest.approx(1.0)
    assert bleu([hyp], [["a b c d e f g h"]]) == pytest.approx(math.exp(1 - 8 / 6))


def test_bleu_short_output_counts_missing_ngram_orders_as_neutral_like_mteval():
    # No 3- or 4-grams in the output: mteval leaves those orders out (sacrebleu would give 0).
    assert bleu(["the cat"], [["the cat"]]) == pytest.approx(1.0)


def test_bleu_agrees_with_sacrebleu_13a_lowercase_on_an_ordinary_corpus():
    hyps = ["The Eagle is a cheap coffee shop near Burger King.", "Zizzi is a pub with a 5 out of 5 rating.",
            "The Mill isn't family-friendly."]
    refs = [["The Eagle coffee shop is cheap and near Burger King.", "Near Burger King is The Eagle."],
            ["Zizzi, a pub, has a customer rating of 5 out of 5."],
            ["The Mill is not family-friendly.", "The Mill is not kid friendly.", "No kids at The Mill."]]
    streams = [[g[k] if k < len(g) else None for g in refs] for k in range(3)]
    expected = sacrebleu.corpus_bleu(hyps, streams, tokenize="13a", lowercase=True).score / 100
    assert bleu(hyps, refs) == pytest.approx(expected, rel=1e-9)


def test_bench_bleu_noise_per_input_statistics_add_up_to_the_corpus_bleu():
    """bench/bleu_noise.py scores bootstrap draws from per-input statistics: over every input once they give the
    library's corpus BLEU, and a draw that repeats inputs gives the BLEU of the corpus with those repeats."""
    bn = bench_module("bleu_noise")
    hyps = ["The Eagle is a cheap coffee shop near Burger King.", "Zizzi is a pub with a 5 out of 5 rating.",
            "The Mill isn't family-friendly.", "Cotto"]
    refs = [["The Eagle coffee shop is cheap and near Burger King.", "Near Burger King is The Eagle."],
            ["Zizzi, a pub, has a customer rating of 5 out of 5."],
            ["The Mill is not family-friendly.", "The Mill is not kid friendly.", "No kids at The Mill."],
            ["Cotto is a coffee shop near The Portland Arms."]]
    per = bn.stats(hyps, refs)
    assert bn.bleu_of(per, [0, 1, 2, 3]) == pytest.approx(bleu(hyps, refs), rel=1e-12)
    draw = [2, 0, 2, 3]
    assert bn.bleu_of(per, draw) == pytest.approx(bleu([hyps[i] for i in draw], [refs[i] for i in draw]), rel=1e-12)
    assert bn.bleu_of(per, draw) != pytest.approx(bleu(hyps, refs))


# ---------------------------------------------------------------- NIST


def test_nist_length_penalty_is_half_at_two_thirds():
    assert nist_length_penalty(2 / 3) == pytest.approx(0.5)
    assert nist_length_penalty(1.0) == nist_length_penalty(1.7) == 1.0
    assert nist_length_penalty(0.0) == 0.0
    assert NIST_BETA == pytest.approx(4.21617, abs=1e-5)


def test_nist_hand_computed_single_reference():
    # ref "a b a c": info(a) = log2(4/2) = 1, info(b) = info(c) = log2(4/1) = 2,
    # info("a b") = log2(count(a) / count(a b)) = log2(2/1) = 1.
    # hyp "a b c": unigrams (1 + 2 + 2) / 3, bigrams ("a b" matches, "b c" not) 1 / 2, no 3-gram match.
    # length ratio 3 / 4 -> penalty exp(-beta * ln(0.75)^2).
    expected = (5 / 3 + 1 / 2) * math.exp(-NIST_BETA * math.log(0.75) ** 2)
    assert nist(["a b c"], [["a b a c"]]) == pytest.approx(expected)
    assert expected == pytest.approx(1.52845, abs=1e-5)


def test_nist_hand_computed_with_varying_number_of_references():
    # refs: {"a b", "a c d e"} and {"c d"}: 8 words; a:2 b:1 c:2 d:2 e:1; "a b":1
    # info: a = log2(8/2) = 2, b = log2(8/1) = 3, c = 2, "a b" = log2(2/1) = 1
    # hyps "a b" and "c": unigram info (2 + 3 + 2) / 3 words, bigram info 1 / 1 bigram.
    # E2E mteval: average reference length = 8 words / (3 refs / 2 inputs) = 16/3, ratio 3 / (16/3).
    expected = (7 / 3 + 1) * math.exp(-NIST_BETA * math.log(3 / (16 / 3)) ** 2)
    assert nist(["a b", "c"], [["a b", "a c d e"], ["c d"]]) == pytest.approx(expected)


def test_nist_is_zero_without_matches_and_grows_with_overlap():
    assert nist(["x y z"], [["a b c"]]) == 0.0
    assert nist(["a b c d e f"], [["a b c d e f"]]) > nist(["a b c x e f"], [["a b c d e f"]]) > 0


# ---------------------------------------------------------------- ROUGE-L and CIDEr (no Java needed)


def test_rouge_l_hand_computed_from_lcs():
    # 1) LCS("the cat sat down", "the dog and cat lay down") = "the cat down" = 3: P = 3/4, R = 3/6
    # 2) multi-ref: "the cat" gives P 2/4, R 2/2; "a cat sat down on the mat" gives P 3/4, R 3/7;
    #    COCO takes max P = 3/4 and max R = 1 separately.  F = (1 + b^2) P R / (R + b^2 P), b = 1.2.
    def f(p, r):
        return (1 + 1.44) * p * r / (r + 1.44 * p)

    hyps = ["the cat sat down", "The Cat sat down."]
    refs = [["the dog and cat lay down"], ["the cat", "a cat sat down on the mat"]]
    expected = (f(3 / 4, 3 / 6) + f(3 / 4, 1.0)) / 2
    assert compute_metrics(hyps, refs, use_java=False)["ROUGE_L"] == pytest.approx(expected)
    assert expected == pytest.approx((0.579114 + 0.879808) / 2, abs=1e-6)


def test_cider_zero_for_disjoint_text():
    hyps = ["red cat sleeps", "blue dog runs"]
    refs = [["green fish swims"], ["yellow bird flies away"]]
    assert compute_metrics(hyps, refs, use_java=False)["CIDEr"] == 0.0


def test_cider_hand_computed():
    # 2 inputs: idf of every n-gram = ln(2) - ln(max(1, df)) = ln 2 (each n-gram is in one input).
    # input 1: identical -> cosine 1 for 1- and 2-grams, 0 for the absent 3-, 4-grams: 10 * 2/4 = 5.
    # input 2: unigrams {blue, dog} vs {blue, fish}: cosine 1/2; bigrams no overlap: 10 * 0.5/4 = 1.25.
    # equal lengths -> no Gaussian length penalty.  CIDEr = mean = 3.125.
    got = compute_metrics(["red cat", "blue dog"], [["red cat"], ["blue fish"]], use_java=False)["CIDEr"]
    assert got == pytest.approx(3.125)


def test_ptb_approximation_on_typical_e2e_text():
    text = "The Eagle isn't cheap (£20-25); it's near Burger King, e.g. \"kid-friendly\" - 3.5 stars!"
    assert ptb_tokenize_approx(text) == (
        "the eagle is n't cheap -lrb- # 20-25 -rrb- it 's near burger king e.g. kid-friendly 3.5 stars"
    )


# ---------------------------------------------------------------- without Java


def test_without_java_meteor_is_none_with_warning_and_the_rest_is_computed(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no java anywhere
    hyps, refs = ["the cat sat on the mat"], [["the cat is on the mat"]]
    got = compute_metrics(hyps, refs)
    assert got["METEOR"] is None
    assert any("METEOR" in w and "java" in w for w in got["warnings"])
    assert any("ROUGE_L" in w for w in got["warnings"])
    assert got["BLEU"] == pytest.approx(bleu(hyps, refs))
    assert got["ROUGE_L"] == pytest.approx(5 / 6)  # LCS 5 of 6 words both ways
    assert set(got) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "warnings"}


def _fake_java(tmp_path, body):
    exe = tmp_path / "java"
    exe.write_text(f"#!/bin/sh\n{body}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_failing_java_gives_warnings_not_errors(monkeypatch, tmp_path):
    _fake_java(tmp_path, "echo 'Error: could not create the Java Virtual Machine' >&2; exit 1")
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ.get("PATH", ""))
    got = compute_metrics(["the cat sat down"], [["the dog and cat lay down"]])
    assert got["METEOR"] is None
    assert any("METEOR not computed" in w and "Virtual Machine" in w for w in got["warnings"])
    assert any("PTB tokeniser failed" in w for w in got["warnings"])
    assert got["ROUGE_L"] == pytest.approx(2.44 * 0.75 * 0.5 / (0.5 + 1.44 * 0.75))


def test_hanging_java_is_killed_after_the_timeout(monkeypatch, tmp_path):
    _fake_java(tmp_path, f"exec '{sys.executable}' -c 'import time; time.sleep(60)'")
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setattr(metrics, "JAVA_TIMEOUT_S", 0.5)
    got = compute_metrics(["a b"], [["a b"]])
    assert got["METEOR"] is None
    assert sum("within 0.5 s" in w for w in got["warnings"]) == 2  # tokeniser and METEOR


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="2 outputs but 1"):
        compute_metrics(["a", "b"], [["a"]], use_java=False)
    with pytest.raises(ValueError, match="no outputs"):
        compute_metrics([], [], use_java=False)
    with pytest.raises(ValueError, match=r"refs\[0\]"):
        compute_metrics(["a"], [[]], use_java=False)
    with pytest.raises(TypeError):
        compute_metrics(["a"], ["a"], use_java=False)


# ---------------------------------------------------------------- with Java


@pytest.fixture(scope="module")
def meteor_run():
    if JAVA is None:
        pytest.skip("java not on PATH: METEOR 1.5 needs it")
    gts = {0: ["the eagle is a cheap coffee shop near burger king"],
           1: ["the mill is a family friendly pub in the city centre"],
           2: ["zizzi serves french food"],
           3: ["cotto has a high customer rating"]}
    res = {0: ["the eagle is a cheap coffee shop near burger king"],  # identical
           1: ["the mill is a kid friendly pub in the centre of the city"],  # near match
           2: ["blue elephants whistle quietly"],  # unrelated
           3: [""]}  # empty output
    return meteor_score(gts, res, JAVA)


@needs_java
def test_meteor_segment_scores_are_ordered_sensibly(meteor_run):
    corpus, (same, near, unrelated, empty) = meteor_run
    assert 0.5 < same <= 1.0  # METEOR's fragmentation penalty keeps one-chunk matches below 1
    assert 0.3 < near < same
    assert unrelated == 0.0 and empty == 0.0
    assert 0.0 < corpus < 1.0


@needs_java
def test_java_ptb_tokeniser_matches_approximation_on_e2e_like_text():
    texts = ["The Eagle is a coffee shop near Burger King. It's cheap.",
             "Cotto, a coffee shop with a 5 out of 5 rating, serves Indian food in the £20-25 range.",
             "The Rice Boat isn't kid-friendly; it's in the city centre (near Express by Holiday Inn).",
             "Giraffe is a family-friendly pub by the riverside that serves English food: \"great\"!",
             "There is a cheap Japanese restaurant called 'The Wrestlers' - 1 out of 5 - near Clare Hall.",
             ""]
    assert ptb_tokenize_java(texts, JAVA) == [ptb_tokenize_approx(t) for t in texts]


@needs_java
def test_rouge_and_cider_match_pycocoevalcap_pipeline(monkeypatch):
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    hyps = ["The Eagle is cheap (£20-25).", "Zizzi isn't a pub.", "Near Burger King, it's 5-star!"]
    refs = [["The Eagle is a cheap coffee shop.", "Cheap: The Eagle."], ["Zizzi is not a pub, it's a cafe."],
            ["It's a 5-star place near Burger King.", "Near Burger King.", "A five star venue."]]
    try:  # pycocoevalcap's own tokenizer writes a temporary file into its package directory
        tok = PTBTokenizer()
        gts = tok.tokenize({i: [{"caption": r} for r in g] for i, g in enumerate(refs)})
        res = tok.tokenize({i: [{"caption": h}] for i, h in enumerate(hyps)})
    except OSError as err:
        pytest.skip(f"pycocoevalcap's PTBTokenizer cannot run here: {err}")
    monkeypatch.setattr(metrics, "meteor_score", lambda *args: (0.0, []))  # METEOR is checked above
    got = compute_metrics(hyps, refs)
    assert not got["warnings"]
    assert got["ROUGE_L"] == pytest.approx(Rouge().compute_score(gts, res)[0], rel=1e-12)
    assert got["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-12)
