"""How much of the text a reconstruction recovers: token accuracy, BLEU and ROUGE-L, prompt and completion apart.

Positions are split by the labels: the prompt is what has no loss, the completion the rest. The fixed
prompt template (``Input:`` ... ``Output:``) and the final end-of-text token are public and would only
flatter the attack, so they are left out: "prompt" is the linearised input itself (the client's data),
"completion" its reference text. BLEU and ROUGE-L are the project's E2E definitions (evaluate/metrics.py:
mteval BLEU via sacrebleu, pycocoevalcap ROUGE-L) of the decoded reconstruction against the decoded true
tokens at the same positions, without Java.
"""

from __future__ import annotations

import torch

from splitcom.data.records import format_prompt
from splitcom.data.tokenize import IGNORE, Sample
from splitcom.evaluate.metrics import compute_metrics


def _template(tokenizer) -> tuple[list[int], list[int]]:
    head, _, tail = format_prompt("\x00").partition("\x00")
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return enc(head.rstrip()), enc(tail)


def spans(sample: Sample, tokenizer) -> dict[str, range]:
    """Positions of the prompt content and of the completion (without template and end-of-text)."""
    n = len(sample.ids)
    p = next((i for i, lab in enumerate(sample.labels) if lab != IGNORE), n)
    head, tail = _template(tokenizer)
    ids = list(sample.ids)
    a = len(head) if head and ids[: len(head)] == head else 0
    b = p - len(tail) if tail and p - len(tail) >= a and ids[p - len(tail) : p] == tail else p
    end = n - 1 if n > p and ids[-1] == tokenizer.eos_token_id else n
    return {"prompt": range(a, b), "completion": range(p, end)}


def score(samples: list[Sample], preds: list[torch.Tensor], tokenizer) -> dict[str, dict]:
    """{part: {tokens, token_acc, bleu, rouge_l}} for part in prompt, completion."""
    out: dict[str, dict] = {}
    for part in ("prompt", "completion"):
        hits = total = 0
        hyps, refs = [], []
        for s, pred in zip(samples, preds, strict=True):
            pos = list(spans(s, tokenizer)[part])
            if not pos:
                continue
            true = [s.ids[i] for i in pos]
            guess = [int(pred[i]) for i in pos]
            hits += sum(t == g for t, g in zip(true, guess, strict=True))
            total += len(pos)
            ref = tokenizer.decode(true, skip_special_tokens=True).strip()
            if ref:
                hyps.append(tokenizer.decode(guess, skip_special_tokens=True).strip())
                refs.append([ref])
        m = compute_metrics(hyps, refs, use_java=False) if hyps else {}
        out[part] = {"tokens": total, "token_acc": hits / total if total else None,
                     "bleu": m.get("BLEU"), "rouge_l": m.get("ROUGE_L")}
    return out


def examples(samples: list[Sample], preds_by_attack: dict[str, list[torch.Tensor]], tokenizer, n: int = 3) -> list:
    """A few reconstructions next to the truth, for a human to judge."""
    rows = []
    for k, s in enumerate(samples[:n]):
        sp = spans(s, tokenizer)
        row = {part: tokenizer.decode([s.ids[i] for i in sp[part]], skip_special_tokens=True) for part in sp}
        for attack, preds in preds_by_attack.items():
            if k >= len(preds):  # (the optimisation attack may have run on fewer samples)
                continue
            row[attack] = {part: tokenizer.decode([int(preds[k][i]) for i in sp[part]], skip_special_tokens=True)
                           for part in sp}
        rows.append(row)
    return rows
