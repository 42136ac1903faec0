"""How much of act_up prompt-prefix sharing can save as a client's data grows (issue 18, item 5): the share of
all rows of an epoch that a first sight need not send when each sample sends only the rows after the longest
prompt prefix an earlier sample of the same client already sent (E2E: about 8.7 references per MR, and MRs that
begin alike). An upper bound of `compression.prefix` (which also needs the prefix rows' summaries to agree),
against the rows it really shared in bench/scaling.py's runs.

    .venv/bin/python bench/prefix_share.py [--config runs/regime/all/config.yaml] [--samples 80 800 2000 4000 0]

0 samples: the whole E2E training set. Writes bench/results/prefix_share.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shareable(s) -> tuple[float, float, int]:
    """(rows after a shared prompt prefix over all rows, the same for whole repeated prompts only, samples)."""
    from splitcom.data.tokenize import IGNORE

    total = prefix = exact = 0
    for part in s.partitions:
        seen: set[tuple[int, ...]] = set()  # every prompt prefix this client has sent
        prompts: set[tuple[int, ...]] = set()
        for i in part:
            x = s.train[i]
            p = sum(1 for label in x.labels if label == IGNORE)
            ids = tuple(x.ids[:p])
            total += len(x.ids)
            k = 0
            while k < p and ids[:k + 1] in seen:
                k += 1
            prefix += k
            exact += p if ids in prompts else 0
            seen.update(ids[:j] for j in range(1, p + 1))
            prompts.add(ids)
    return prefix / total, exact / total, len(s.train)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "runs" / "regime" / "all" / "config.yaml")
    ap.add_argument("--samples", type=int, nargs="+", default=[80, 800, 2000, 4000, 0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prefix_share.md")
    args = ap.parse_args()
    from splitcom.config import load_config
    from splitcom.federation.setup import prepare

    if not args.config.is_file():
        sys.exit(f"{args.config}: no such config; run the learning regime's `all` row first (bench/regime_queue.sh) "
                 "or pass --config with any run's config.yaml")
    base = load_config(args.config)
    where = args.config.resolve().relative_to(ROOT) if args.config.resolve().is_relative_to(ROOT) else args.config
    lines = ["# Prompt-prefix sharing as a client's data grows (issue 18, item 5)", "",
             f"The data settings of `{where}` ({base.data.dataset.split(':')[0]}, {base.federation.num_clients} "
             f"clients, {base.data.partition.scheme} partition, max length {base.data.max_length}) at each number "
             "of training samples. *Prefix*: rows of the longest prompt "
             "prefix the same client already sent, over all rows of an epoch (what `compression.prefix` can save "
             "at most on first sights); *whole prompt*: counting repeated prompts (the same MR) only.", "",
             "| train samples | samples per client | prefix | whole prompt |", "| ---: | ---: | ---: | ---: |"]
    for n in args.samples:
        cfg = base.model_copy(update={"data": base.data.model_copy(update={"max_train_samples": n or None})})
        pre, whole, got = shareable(prepare(cfg))
        lines.append(f"| {got:,} | {got / cfg.federation.num_clients:,.0f} | {100 * pre:.1f} % | {100 * whole:.1f} % |")
        print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
