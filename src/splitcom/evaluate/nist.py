"""mteval-v13a tokenisation and NIST, as the official E2E NLG challenge script computes them.

The E2E script (tuetschek/e2e-metrics, ``measure_scores.py``) writes the outputs and references
into SGML files and runs ``mteval-v13a-sig.pl`` (a slightly edited mteval-v13a) on them; BLEU and
NIST are read from its output.  This module reproduces that Perl code in Python:

* tokenisation: mteval's default ("11b") tokeniser, which sacrebleu ships as ``Tokenizer13a``,
  followed by mteval's lowercasing ``tr/[A-Z]/[a-z]/`` -- ASCII letters only, as in Perl;
* NIST: n = 5, information weights from the n-gram counts of *all* references of the corpus,
  length penalty ``exp(-beta * ln(ratio)^2)`` for ratio < 1, with ``beta`` set so that the
  penalty is 0.5 at a length ratio of 2/3.

Why NIST is written here rather than imported: no maintained library computes mteval's NIST.
sacrebleu (the reference BLEU/chrF/TER implementation) has no NIST; NLTK's ``corpus_nist`` uses
its own tokenisation, divides by the whole reference length instead of mteval's average
reference length and is not checked against the Perl script; the E2E repository's own Python
port (``pymteval``) is not packaged and, by its own note, differs from the Perl script that the
official scores come from when inputs have different numbers of references.  The code below
follows the Perl (``score_segment``, ``nist_score``, ``compute_ngram_info``) line by line,
including the E2E edit that averages the reference length over the *non-empty* references of
each input (E2E inputs have between 1 and ~10 references).
"""

from __future__ import annotations

import math
import string
from collections import Counter
from collections.abc import Sequence

from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

NIST_MAX_N = 5
# mteval-v13a: ratio_x = 1.5, score_x = 0.5, beta = -log(score_x) / log(ratio_x)^2, so that the
# penalty exp(-beta * log(ratio)^2) is exactly 0.5 at ratio = 2/3 (system output 2/3 as long).
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2

_TOKENIZER_13A = Tokenizer13a()
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def mteval_tokenize(text: str) -> list[str]:
    """Tokens of ``text`` as mteval-v13a sees them (default tokeniser, case folded).

    mteval first collapses every whitespace run of the SGML segment to one space, then tokenises
    (entity decoding, punctuation split), lowercasing ASCII letters only (``tr/[A-Z]/[a-z]/``).
    Lowercasing after the 13a regexes gives the same result, since those regexes touch no letter.
    """
    collapsed = " ".join(text.split())
    return _TOKENIZER_13A(collapsed).translate(_ASCII_LOWER).split()


def nist_length_penalty(ratio: float) -> float:
    """mteval's NIST brevity penalty for ``ratio`` = system length / average reference length."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-NIST_BETA * math.log(ratio) ** 2)


def _ngrams(tokens: Sequence[str], max_n: int) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i : i + n])] += 1
    return counts


def corpus_nist(
    hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[Sequence[str]]], max_n: int = NIST_MAX_N
) -> float:
    """System-level NIST of tokenised ``hyps`` against tokenised ``refs`` (mteval-v13a-sig).

    ``hyps[i]`` is the token list of output i, ``refs[i]`` the token lists of its references.
    """
    if len(hyps) != len(refs) or not hyps:
        raise ValueError(f"need as many reference groups as outputs, and at least one ({len(hyps)} vs {len(refs)})")

    # compute_ngram_info: n-gram counts over every reference segment of the corpus.
    ref_counts: Counter[tuple[str, ...]] = Counter()
    total_ref_words = 0
    for group in refs:
        for ref in group:
            ref_counts.update(_ngrams(ref, max_n))
            total_ref_words += len(ref)

    def info(ngram: tuple[str, ...]) -> float:
        # -log2(count(w1..wn) / count(w1..wn-1)); for unigrams the denominator is the word total.
        context = ref_counts[ngram[:-1]] if len(ngram) > 1 else total_ref_words
        return math.log2(context / ref_counts[ngram])

    match_info = [0.0] * (max_n + 1)  # index n: information of matched n-grams
    hyp_ngram_total = [0] * (max_n + 1)  # index n: n-grams in the outputs
    nonempty_refs = 0
    for hyp, group in zip(hyps, refs, strict=True):
        # score_segment: clip each output n-gram count by its maximum count in one reference.
        max_ref: Counter[tuple[str, ...]] = Counter()
        for ref in group:
            max_ref |= _ngrams(ref, max_n)
            nonempty_refs += bool(ref)
        for ngram, count in _ngrams(hyp, max_n).items():
            if ngram in max_ref:
                match_info[len(ngram)] += info(ngram) * min(count, max_ref[ngram])
        for n in range(1, max_n + 1):
            hyp_ngram_total[n] += max(len(hyp) - n + 1, 0)

    if total_ref_words == 0 or nonempty_refs == 0:
        return 0.0  # mteval would divide by zero; there is nothing to score against
    score = sum(match_info[n] / max(hyp_ngram_total[n], 1) for n in range(1, max_n + 1))
    # nist_score: ratio = output words / (reference words / average number of references).
    avg_ref_words = total_ref_words / (nonempty_refs / len(hyps))
    return score * nist_length_penalty(hyp_ngram_total[1] / avg_ref_words)
