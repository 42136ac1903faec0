"""Score a system-output file against an E2E reference file (``splitcom score --refs F --hyps F``).

File formats are those of the official E2E script (tuetschek/e2e-metrics, ``measure_scores.py``):

* outputs (``--hyps``): one output per line, UTF-8; every line counts, so an empty line is an
  empty output;
* references (``--refs``): the references of each input on consecutive lines, one blank line
  between inputs.  A file without any blank line is read, as the official script does, as
  single-reference data: one reference per line, each line its own input.

Lines are stripped of surrounding whitespace, as the official script does.  Two small
robustness changes: a UTF-8 byte-order mark is ignored, and in the reference file blank lines
at the start and runs of several blank lines count as one separator (the official script would
produce an input without references and crash).
"""

from __future__ import annotations

import json
from pathlib import Path

from splitcom.errors import UserError
from splitcom.evaluate.metrics import METRIC_NAMES, compute_metrics


def _read_lines(path: str | Path, what: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file not found" if not p.exists() else f"{what} path is not a file", where=str(p))
    try:
        with p.open(encoding="utf-8-sig") as fh:
            lines = [line.strip() for line in fh]
    except UnicodeDecodeError as err:
        raise UserError(f"{what} file is not valid UTF-8 ({err.reason} at byte {err.start})", where=str(p)) from None
    except OSError as err:
        raise UserError(f"cannot read {what} file ({err.strerror or err})", where=str(p)) from None
    if not lines:
        raise UserError(f"{what} file is empty", where=str(p))
    return lines


def read_hyps(path: str | Path) -> list[str]:
    """System outputs, one per line (an empty line is an empty output)."""
    return _read_lines(path, "hypotheses")


def read_refs(path: str | Path) -> list[list[str]]:
    """Reference groups in the E2E multi-reference format (blank line between inputs)."""
    groups: list[list[str]] = [[]]
    for line in _read_lines(path, "references"):
        if line:
            groups[-1].append(line)
        elif groups[-1]:
            groups.append([])
    if not groups[-1]:
        groups.pop()
    if not groups:
        raise UserError("references file is empty (only blank lines)", where=str(path))
    if len(groups) == 1:  # no separator at all: single-reference file, as in measure_scores.py
        groups = [[ref] for ref in groups[0]]
    return groups


def score_files(refs_path: str | Path, hyps_path: str | Path, *, use_java: bool = True) -> dict:
    """Read both files, check that they line up, and return :func:`compute_metrics`'s dict."""
    refs = read_refs(refs_path)
    hyps = read_hyps(hyps_path)
    if len(hyps) != len(refs):
        hint = ""
        if all(len(group) == 1 for group in refs):
            hint = " (a reference file without blank lines is read as one reference per line)"
        raise UserError(
            f"{len(hyps)} hypotheses in {hyps_path} but {len(refs)} reference groups in {refs_path}; "
            f"the hypothesis file needs one line per reference group{hint}",
            where="--hyps",
        )
    return compute_metrics(hyps, refs, use_java=use_java)


def format_scores(scores: dict) -> str:
    """The official script's report ("SCORES:" header, then ``NAME: 0.1234`` lines) plus warnings."""
    lines = ["SCORES:", "=============="]
    for name in METRIC_NAMES:
        value = scores.get(name)
        lines.append(f"{name}: {value:.4f}" if value is not None else f"{name}: n/a")
    lines += [f"warning: {w}" for w in scores.get("warnings", [])]
    return "\n".join(lines)


def score_command(refs_path: str | Path, hyps_path: str | Path, *, as_json: bool = False) -> str:
    """The text that ``splitcom score --refs F --hyps F [--json]`` prints on stdout."""
    scores = score_files(refs_path, hyps_path)
    return json.dumps(scores, indent=2) if as_json else format_scores(scores)
