"""The official E2E NLG challenge metrics: BLEU, NIST, METEOR, ROUGE_L and CIDEr.

The reference is tuetschek/e2e-metrics ``measure_scores.py``, which computes

* BLEU and NIST with ``mteval-v13a-sig.pl`` on the raw texts (mteval tokenises and lowercases):
  here BLEU's n-gram statistics come from sacrebleu on mteval-tokenised text and the final
  formula is mteval's (see :func:`corpus_bleu`); NIST is in :mod:`splitcom.evaluate.nist`;
* METEOR, ROUGE_L and CIDEr with the MS-COCO caption evaluation (``COCOEvalCap.evaluate``): the
  raw texts go through the Stanford PTBTokenizer (``-preserveLines -lowerCase``, then tokens in
  pycocoevalcap's ``PUNCTUATIONS`` list are dropped), and the tokenised texts are scored by
  METEOR 1.5 (``-l en -norm``), ROUGE-L (beta 1.2) and CIDEr-D (n 4, sigma 6), all from the
  pycocoevalcap package (same jars and code as the copy bundled with e2e-metrics).

The PTB tokeniser and METEOR are Java programs.  Without Java (or when the Java call fails),
METEOR is reported as ``None`` with a message in ``result["warnings"]``, and ROUGE_L and CIDEr
are computed on the output of :func:`ptb_tokenize_approx`, a pure-Python approximation of the
Stanford tokeniser (same on ordinary E2E sentences; rare constructions may tokenise differently,
which a warning says).
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import pycocoevalcap.meteor.meteor as _meteor_mod
import pycocoevalcap.tokenizer.ptbtokenizer as _ptb_mod
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS
from sacrebleu.metrics import BLEU

from splitcom.evaluate.nist import corpus_nist, mteval_tokenize

METRIC_NAMES = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
BLEU_MAX_N = 4
JAVA_TIMEOUT_S = 900.0  # per Java program (PTB tokeniser, METEOR); a hung JVM is killed after this

# The jars that pycocoevalcap ships next to its Python wrappers.
METEOR_JAR = Path(_meteor_mod.__file__).with_name(_meteor_mod.METEOR_JAR)
PTB_JAR = Path(_ptb_mod.__file__).with_name(_ptb_mod.STANFORD_CORENLP_3_4_1_JAR)
_PUNCTUATIONS = frozenset(PUNCTUATIONS)


class JavaToolError(RuntimeError):
    """A Java helper (PTB tokeniser or METEOR) could not be run or gave unusable output."""


def compute_metrics(hyps: Sequence[str], refs: Sequence[Sequence[str]], *, use_java: bool = True) -> dict:
    """Score system outputs ``hyps`` against reference groups ``refs`` like the E2E script.

    ``refs[i]`` holds the (one or more) references of output ``hyps[i]``.  Returns a dict with
    "BLEU", "METEOR", "ROUGE_L" in [0, 1], "NIST" (about 0-10+), "CIDEr" (about 0-10), and
    "warnings", a list of messages (non-empty when a Java step was skipped or replaced).
    ``use_java=False`` skips Java as if it were not installed.
    """
    hyps, refs = _check_inputs(hyps, refs)
    warnings: list[str] = []
    java = shutil.which("java") if use_java else None
    if java is None:
        why = "disabled by use_java=False" if not use_java else "no `java` executable on PATH"
        warnings.append(f"METEOR not computed ({why}); METEOR 1.5 needs Java")

    # BLEU and NIST: mteval-v13a on the raw texts.
    hyp_toks = [mteval_tokenize(h) for h in hyps]
    ref_toks = [[mteval_tokenize(r) for r in group] for group in refs]
    scores: dict = {"BLEU": corpus_bleu(hyp_toks, ref_toks), "NIST": corpus_nist(hyp_toks, ref_toks)}

    # METEOR, ROUGE_L, CIDEr: COCO caption evaluation on PTB-tokenised, lowercased texts.
    flat_refs = [r for group in refs for r in group]
    tokenized = None
    if java is not None:
        try:
            tokenized = ptb_tokenize_java(flat_refs + hyps, java)
        except JavaToolError as err:
            warnings.append(f"Stanford PTB tokeniser failed ({err})")
    if tokenized is None:
        tokenized = [ptb_tokenize_approx(t) for t in flat_refs + hyps]
        warnings.append(
            "ROUGE_L and CIDEr computed on splitcom's Python approximation of the Stanford PTB "
            "tokeniser (the Java one could not be used); they can differ slightly from official E2E scores"
        )
    gts, res, start = {}, {}, 0
    for i, group in enumerate(refs):
        gts[i] = tokenized[start : start + len(group)]
        start += len(group)
    for i in range(len(hyps)):
        res[i] = [tokenized[start + i]]

    scores["METEOR"] = None
    if java is not None:
        try:
            scores["METEOR"] = meteor_score(gts, res, java)[0]
        except JavaToolError as err:
            warnings.append(f"METEOR not computed (reported as None): {err}")
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return {name: scores[name] for name in METRIC_NAMES} | {"warnings": warnings}


def _check_inputs(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """Validate shapes and collapse whitespace runs (newlines would break the line-based tools)."""
    if isinstance(hyps, str) or isinstance(refs, str):
        raise TypeError("hyps must be a list of strings and refs a list of lists of strings")
    if not hyps:
        raise ValueError("no outputs to score")
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} outputs but {len(refs)} reference groups")
    clean_hyps = [" ".join(h.split()) for h in hyps]
    clean_refs = []
    for i, group in enumerate(refs):
        if isinstance(group, str):
            raise TypeError(f"refs[{i}] must be a list of reference strings, not a string")
        cleaned = [" ".join(r.split()) for r in group]
        if not cleaned or not all(cleaned):
            raise ValueError(f"refs[{i}] must hold at least one reference and no empty reference")
        clean_refs.append(cleaned)
    return clean_hyps, clean_refs


def corpus_bleu(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[Sequence[str]]]) -> float:
    """mteval-v13a BLEU (n=4, closest reference length, mteval smoothing) of tokenised texts.

    sacrebleu collects the statistics (clipped n-gram matches, n-gram totals, output length,
    closest reference length with ties to the shorter one, as mteval).  The last step is
    mteval's ``bleu_score``: identical to sacrebleu's ``smooth_method='exp'`` on real corpora,
    but also right on tiny ones, where sacrebleu returns 0 if there is no match at all or some
    n-gram order has no n-gram, while mteval smooths a zero match count to 1/2^k of the n-gram
    count and leaves an order without any n-gram out of the product (precision 1).
    """
    return mteval_bleu(*bleu_stats(hyps, refs))


def bleu_stats(hyps: Sequence[Sequence[str]],
               refs: Sequence[Sequence[Sequence[str]]]) -> tuple[list[int], list[int], int, int]:
    """BLEU's corpus statistics of tokenised texts, from sacrebleu: (clipped matches by n-gram order,
    n-gram totals by order, output length, closest reference length).  They add up over inputs, so
    statistics taken one input at a time score any resample of the inputs (bench/bleu_noise.py)."""
    n_streams = max(len(group) for group in refs)
    streams = [[" ".join(g[k]) if k < len(g) else None for g in refs] for k in range(n_streams)]
    # tokenize="none": the texts are mteval tokens already; force: no warning that they look tokenised.
    st = BLEU(tokenize="none", lowercase=False, force=True).corpus_score([" ".join(h) for h in hyps], streams)
    return list(st.counts), list(st.totals), st.sys_len, st.ref_len


def mteval_bleu(matches: Sequence[int], totals: Sequence[int], sys_len: int, ref_len: int) -> float:
    """mteval-v13a ``bleu_score`` (smoothed) from corpus statistics."""
    if sys_len <= 0:
        return 0.0
    log_sum, smooth = 0.0, 1
    for match, total in zip(matches, totals, strict=True):
        if total == 0:
            continue
        if match == 0:
            smooth *= 2
            log_sum += math.log(1.0 / (smooth * total))
        else:
            log_sum += math.log(match / total)
    return math.exp(log_sum / BLEU_MAX_N + min(0.0, 1.0 - ref_len / sys_len))


def ptb_tokenize_java(texts: Sequence[str], java: str = "java") -> list[str]:
    """pycocoevalcap's ``PTBTokenizer.tokenize`` for single-line ``texts``, in one JVM call.

    Same jar, flags and punctuation filter as pycocoevalcap; the input file lives in a private
    temporary directory instead of pycocoevalcap's package directory (which may be read-only).
    """
    with tempfile.TemporaryDirectory(prefix="splitcom-ptb-") as tmp:
        path = Path(tmp) / "sentences.txt"
        path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
        cmd = [java, "-cp", str(PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
               "-lowerCase", str(path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=JAVA_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise JavaToolError(f"did not finish within {JAVA_TIMEOUT_S:g} s") from None
        except OSError as err:
            raise JavaToolError(f"cannot run {java}: {err}") from None
    if proc.returncode != 0:
        raise JavaToolError(f"exit status {proc.returncode}: {_tail(proc.stderr)}")
    lines = proc.stdout.decode("utf-8", errors="replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != len(texts):
        raise JavaToolError(f"{len(lines)} tokenised lines for {len(texts)} inputs")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in _PUNCTUATIONS) for line in lines]


# Pure-Python stand-in for Stanford PTBTokenizer 3.4.1 (-lowerCase) + pycocoevalcap's filter.
_PTB_CHAR_MAP = str.maketrans({
    "(": " -LRB- ", ")": " -RRB- ", "[": " -LSB- ", "]": " -RSB- ", "{": " -LCB- ", "}": " -RCB- ",
    '"': " '' ", "\u201c": " '' ", "\u201d": " '' ", "\u201e": " '' ", "\u00ab": " '' ", "\u00bb": " '' ",
    "\u2018": "'", "\u2019": "'", "\u2014": " -- ", "\u2013": " -- ", "\u2026": " ... ",
    "\u00a3": " # ", "\u20ac": " $ ",  # PTB3 currency normalisation (pound -> #, euro -> $)
})
_ENTITIES = (("&quot;", '"'), ("&apos;", "'"), ("&lt;", "<"), ("&gt;", ">"), ("&amp;", "&"))
_PTB_TOKEN = re.compile(
    r"""-[lr][rsc]b- | n't | '(?:s|re|ve|ll|m|d)\b     # bracket escapes (lowercased), clitics
      | (?:[^\W\d_]\.)+(?!\w)                          # initials, initialisms: a.  e.g.  u.s.
      | (?:mr|mrs|ms|dr|st|jr|sr|prof|vs|etc|inc|ltd|co)\.(?=\s|$)
      | \d+(?:[.,:]\d+)+(?:-\w+)*                      # numbers: 3.5  1,000  10:30  3.5-star
      | \w+(?:[-/]\w+)*                               # words: kid-friendly  20-25  and/or  1/2
      | -- | \.\.\. | '' | `` | \S""",
    re.VERBOSE,
)


def ptb_tokenize_approx(text: str) -> str:
    """Lowercase and tokenise ``text`` like Stanford PTBTokenizer, then drop punctuation tokens.

    Covers what E2E texts contain: clitics (``it's`` -> ``it 's``, ``isn't`` -> ``is n't``),
    punctuation split off words but kept inside numbers (``3.5``, ``20-25``), hyphenated words
    kept whole, brackets as ``-lrb-``/``-rrb-`` (kept: pycocoevalcap only drops the upper-case
    forms), pound sign as ``#``.  Known gaps: Stanford's full abbreviation list, URLs, e-mails,
    emoticons and a few other special cases.
    """
    for entity, char in _ENTITIES:
        text = text.replace(entity, char)
    t = text.translate(_PTB_CHAR_MAP).lower()
    t = re.sub(r"\b(can)(not)\b", r"\1 \2", t)
    t = re.sub(r"\b(gon|got|wan)(na)\b", r"\1 \2", t)
    t = re.sub(r"(\w)(n't)\b", r"\1 \2", t)
    t = re.sub(r"(\w)('(?:s|re|ve|ll|m|d))\b", r"\1 \2", t)
    return " ".join(w for w in _PTB_TOKEN.findall(t) if w not in _PUNCTUATIONS)


def meteor_score(gts: dict, res: dict, java: str = "java") -> tuple[float, list[float]]:
    """Corpus and per-output METEOR 1.5 exactly as pycocoevalcap's ``Meteor.compute_score``.

    Same jar, flags (``-stdio -l en -norm``, ``-Xmx2G``) and protocol: one ``SCORE`` line per
    output gives its sufficient statistics, one ``EVAL`` line aggregates them into the corpus
    score.  Driven here rather than through ``pycocoevalcap.meteor.Meteor`` because that class
    never drains the JVM's stderr, has no timeout, and keeps its lock after a failed call, so its
    ``__del__`` then blocks forever; any failure here raises :class:`JavaToolError` instead.
    """
    cmd = [java, "-jar", "-Xmx2G", str(METEOR_JAR), "-", "-", "-stdio", "-l", "en", "-norm"]
    with tempfile.TemporaryFile() as errfile:
        try:
            proc = subprocess.Popen(cmd, cwd=METEOR_JAR.parent, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=errfile)
        except OSError as err:
            raise JavaToolError(f"cannot run {java}: {err}") from None
        timed_out = threading.Event()

        def on_timeout() -> None:
            timed_out.set()
            proc.kill()

        watchdog = threading.Timer(JAVA_TIMEOUT_S, on_timeout)
        watchdog.start()

        def ask(line: str | None = None) -> str:
            try:
                if line is not None:
                    proc.stdin.write((line + "\n").encode("utf-8"))
                    proc.stdin.flush()
                answer = proc.stdout.readline().decode("utf-8").strip()
            except OSError:
                answer = ""
            if not answer:
                proc.kill()
                proc.wait()
                if timed_out.is_set():
                    raise JavaToolError(f"METEOR did not finish within {JAVA_TIMEOUT_S:g} s")
                errfile.seek(0)
                raise JavaToolError(f"METEOR ended early (exit status {proc.returncode}): "
                                    f"{_tail(errfile.read())}")
            return answer

        def clean(s: str) -> str:  # pycocoevalcap's sanitising of the hypothesis, applied to all
            return s.replace("|||", "").replace("  ", " ")

        try:
            stats = [ask(" ||| ".join(["SCORE", *map(clean, gts[k]), clean(res[k][0])])) for k in gts]
            answers = [ask(" ||| ".join(["EVAL", *stats]))]  # one score per output, then the corpus score
            answers += [ask() for _ in range(len(stats))]
            try:
                return float(answers[-1]), [float(a) for a in answers[:-1]]
            except ValueError:
                raise JavaToolError(f"unexpected METEOR output {answers!r:.200}") from None
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    stream.close()


def _tail(data: bytes, limit: int = 300) -> str:
    text = " ".join(data.decode("utf-8", errors="replace").split())
    return text[-limit:] if text else "no error output"
