"""``splitcom audit RUN``: play the server as an attacker and measure what it reconstructs of the client's text.

Threat model (semi-white-box, as BiSR, arXiv 2409.00960): an honest-but-curious server that knows the
pretrained weights, the client adapters it aggregates (the run's final global adapter), the run's config
(cut, codec, reuse, prefixes, noise) and public text of another dataset. It sees what act_up carries for the
client's dev samples (capture.py) and reconstructs their tokens with a learned inverter (inverters.py) and an
optimisation attack (attacks.py). In U-shape it also attacks the activations it computes itself at the
second cut (act_down), where the labels it never receives would be read. Writes ``RUN/audit.json``.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from splitcom.audit.attacks import optimisation_attack, token_embeddings
from splitcom.audit.capture import capture_act_up, reuse_on, server_body
from splitcom.audit.inverters import LearnedInverter, features
from splitcom.audit.scores import examples, score
from splitcom.config import Config, load_config
from splitcom.data import load_dataset, synthetic
from splitcom.data.tokenize import tokenize
from splitcom.errors import UserError
from splitcom.federation.setup import prepare, tail_layers
from splitcom.models.adapters import GLOBAL
from splitcom.runlog import write_json

AUDIT_FILE = "audit.json"
HELD_OUT_SEED = 1_000_003  # the synthetic public set: a seed stream the run's data never uses


def check_run(out: Path) -> Config:
    """The run's config; exit-2 errors for a directory that is not an SFL run with a saved adapter."""
    if not out.is_dir():
        raise UserError("run directory not found", where=str(out))
    if not (out / "config.yaml").is_file() or not (out / "metrics.jsonl").is_file():
        raise UserError("not a run directory (no config.yaml and metrics.jsonl)", where=str(out))
    cfg = load_config(out / "config.yaml")
    if cfg.federation.mode == "fl":
        raise UserError("a federated-LoRA run (federation.mode=fl): only adapters cross the wire, no activation "
                        "to reconstruct text from", where=str(out))
    if cfg.federation.mode != "sfl":
        raise UserError("a centralized run: nothing crosses a wire, so there is no server traffic to audit",
                        where=str(out))
    if not (out / "adapter" / "adapter_model.safetensors").is_file():
        raise UserError("run has no saved adapter yet (adapter/adapter_model.safetensors)", where=str(out))
    return cfg


def public_spec(cfg: Config) -> str:
    """Text the server owns: another dataset than the client's. E2E <-> WebNLG 2017 where the other sits next
    to the client's data; else a held-out seed of the synthetic generator."""
    kind, _, arg = cfg.data.dataset.partition(":")
    if kind == "e2e" and (Path(arg).parent / "webnlg2017" / "train").is_dir():
        return f"webnlg:{Path(arg).parent / 'webnlg2017'}"
    if kind == "webnlg" and (Path(arg).parent / "e2e" / "trainset.csv").is_file():
        return f"e2e:{Path(arg).parent / 'e2e'}"
    return "synthetic"


def public_samples(spec: str, n: int, tokenizer, max_length: int, seed: int):
    if spec == "synthetic":
        examples_ = synthetic.generate(n, seed + HELD_OUT_SEED)
    else:
        examples_ = load_dataset(spec, seed=seed)[0]
        examples_ = random.Random(seed).sample(examples_, min(n, len(examples_)))
    return tokenize(examples_, tokenizer, max_length)


def load_global_adapter(s, out: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    s.bank.load(GLOBAL, {k.removeprefix("base_model.model."): v for k, v in state.items()})


def _learned(split, train_rows, train_samples, rows, samples, tok, seed: int, epochs: int) -> tuple[dict, list]:
    inv = LearnedInverter(train_rows[0].shape[1], seed=seed, table=token_embeddings(split))
    stats = inv.fit(*features(train_rows, train_samples), epochs=epochs)
    preds = inv.predict(rows)
    truth = torch.cat([torch.tensor(s.ids) for s in samples])
    return {**score(samples, preds, tok), "coverage": inv.coverage(truth), "classes": stats.classes,
            "train_tokens": stats.train_tokens, "public_held_out_acc": stats.held_out_acc,
            "epochs": stats.epochs, "seconds": stats.seconds}, preds


def audit_run(out: str | Path, *, dev_samples: int = 32, public: str | None = None, public_n: int = 300,
              opt_samples: int = 8, steps: int = 120, epochs: int = 6, write: bool = True) -> dict:
    t0 = time.perf_counter()
    out = Path(out)
    cfg = check_run(out)
    torch.manual_seed(cfg.train.seed)
    s = prepare(cfg)
    load_global_adapter(s, out)
    s.split.model.eval()
    tok, seed = s.tokenizer, cfg.train.seed
    summary_cuts = _summary_cuts(out)
    cut = summary_cuts[0] if summary_cuts else cfg.split.cut_layer
    dev = s.val[:dev_samples]
    spec = public or public_spec(cfg)
    pub = public_samples(spec, public_n, tok, cfg.data.max_length, seed)
    cap = capture_act_up(cfg, s.split, dev, cut, s.pad_id)
    pub_cap = capture_act_up(cfg, s.split, pub, cut, s.pad_id, passes=1)
    act_up, learned_preds = _learned(s.split, pub_cap.rows, pub, cap.rows, dev, tok, seed, epochs)
    opt_preds, opt_info = optimisation_attack(s.split, cap.rows[:opt_samples], cut, steps=steps, seed=seed) \
        if opt_samples else ([], {})
    streams = {"act_up": {"learned": act_up}}
    if opt_samples:
        streams["act_up"]["optimisation"] = {**score(dev[:opt_samples], opt_preds, tok), **opt_info,
                                             "samples": len(opt_preds)}
    k2 = None
    if tail_layers(cfg):
        k2 = s.split.num_layers - tail_layers(cfg)
        down, pub_down = server_body(s.split, cap, cut, k2), server_body(s.split, pub_cap, cut, k2)
        streams["act_down"] = {"learned": _learned(s.split, pub_down, pub, down, dev, tok, seed, epochs)[0]}
    p = cfg.privacy
    result = {
        "run": str(out), "model": cfg.model.name, "split_mode": cfg.split.mode, "cut_layer": cut, "tail_start": k2,
        "codec": _act_up_codec(cfg), "reuse": reuse_on(cfg), "prefix": cfg.compression.prefix,
        "noise": p.noise, "clip": p.clip, "dev_samples": len(dev), "public": spec, "public_samples": len(pub),
        "act_up_bytes": cap.bytes, "streams": streams,
        "examples": examples(dev, {"learned": learned_preds, **({"optimisation": opt_preds} if opt_preds else {})},
                             tok),
        "not_audited": ["grad_down", "grad_up"] if k2 else ["grad_down", "labels_up (standard mode sends labels)"],
        "wall_s": time.perf_counter() - t0,
    }
    if write:
        write_json(out / AUDIT_FILE, result)
    return result


def _summary_cuts(out: Path) -> list[int]:
    import json

    path = out / "summary.json"
    try:
        return list(json.loads(path.read_text(encoding="utf-8")).get("cuts") or []) if path.is_file() else []
    except (ValueError, OSError):
        return []


def _act_up_codec(cfg: Config) -> str:
    c = cfg.compression.codec
    return c.get("act_up", "fp32") if isinstance(c, dict) else c
