"""From a Config to ready objects: model + LoRA, tokenized data, partitions (shared by every mode), and
a run's server and clients with their sides' stream plans (shared by simulation and deployment)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from splitcom.compress.noise import act_noise
from splitcom.compress.plan import stream_plan
from splitcom.config import Config, data_seed
from splitcom.data import load_dataset
from splitcom.data.partition import partition
from splitcom.data.records import Example
from splitcom.data.tokenize import Sample, tokenize
from splitcom.errors import UserError
from splitcom.federation.client import SplitClient
from splitcom.federation.fl import FLClient
from splitcom.federation.schedule import LRSchedule, lr_schedule, server_frozen_from, skip_from
from splitcom.federation.server import SplitServer
from splitcom.models.adapters import AdapterBank, attach_lora
from splitcom.models.hold import hold_only, prefix_length
from splitcom.models.load import load_model, resolve_device
from splitcom.models.split import SplitModel


@dataclass
class Setup:
    cfg: Config
    split: SplitModel
    bank: AdapterBank
    tokenizer: object
    train_examples: list[Example]
    val_examples: list[Example]
    train: list[Sample]
    val: list[Sample]
    partitions: list[list[int]]  # sample ids per client
    device: torch.device

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


def _subset(items: list, cap: int | None, seed: int) -> list:
    if cap is None or cap >= len(items):
        return items
    idx = sorted(random.Random(seed).sample(range(len(items)), cap))
    return [items[i] for i in idx]


def check_cut(cut: int, num_layers: int, tail_layers: int = 0) -> None:
    if not 1 <= cut <= num_layers - 1:
        raise UserError(f"must be in [1, {num_layers - 1}] for a model with {num_layers} layers (got {cut})",
                        where="split.cut_layer")
    if tail_layers and cut + tail_layers > num_layers - 1:
        raise UserError(f"cut_layer {cut} + tail_layers {tail_layers} leave the server no block of the "
                        f"{num_layers} (the head and tail must not overlap and the server needs at least one)",
                        where="split.cut_layer, split.tail_layers")


def tail_layers(cfg: Config) -> int:
    """Blocks at the end that the client runs (0 in standard mode)."""
    return cfg.split.tail_layers if cfg.split.mode == "ushape" else 0


def prepare(cfg: Config, blocks: Callable[[object], Collection[int] | None] | None = None) -> Setup:
    """``blocks``: a deployed split client's, the decoder blocks it may ever run given the whole model's HF
    config (None: all). The model then holds only those (models/hold.py): a prefix of blocks is all that
    is loaded; blocks past a gap (U-shape's tail) need the whole checkpoint loaded, the rest dropped after
    LoRA is attached (so the tail's LoRA init draws are the whole model's), which leaves the peak of
    that load. Simulation (no ``blocks``) holds every block."""
    if cfg.model.lora.cut_rank is not None and cfg.federation.mode == "sfl" and \
            cfg.federation.server_adapters == "shared":
        raise UserError("a cut rank needs per-client server adapters: the one shared server adapter serves "
                        "every client's cut", where="model.lora.cut_rank, federation.server_adapters")
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    ds = data_seed(cfg)  # train.seed unless data.seed fixes the data across training seeds
    train_ex, val_ex = load_dataset(cfg.data.dataset, cfg.data.synthetic_size, ds, cfg.data)
    train_ex = _subset(train_ex, cfg.data.max_train_samples, ds)
    val_ex = _subset(val_ex, cfg.data.max_eval_samples, ds + 1)
    held: dict[str, Collection[int] | None] = {}

    def leading(model_config) -> int | None:  # how many leading blocks load_model loads
        held["blocks"] = keep = blocks(model_config)
        return None if keep is None else prefix_length(keep)

    model, tok = load_model(cfg.model.name, cfg.model.cache_dir, leading if blocks is not None else None)
    if blocks is not None and "blocks" not in held:  # a random-init alias is built whole without asking
        held["blocks"] = blocks(model.config)
    num_layers = len(SplitModel(model).family.layers(model))
    if cfg.federation.mode == "sfl":
        check_cut(cfg.split.cut_layer, num_layers, tail_layers(cfg))
    lora = cfg.model.lora
    # (PEFT draws each block's LoRA init in block order: the blocks a prefix load holds draw what they draw
    # in the whole model; the global RNG afterwards differs, which only lora.dropout > 0 would see)
    peft_model = attach_lora(model, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
    if held.get("blocks") is not None:
        hold_only(peft_model, held["blocks"], head=tail_layers(cfg) > 0)
    peft_model = peft_model.to(device)
    peft_model.train()
    train = tokenize(train_ex, tok, cfg.data.max_length)
    val = tokenize(val_ex, tok, cfg.data.max_length)
    n = cfg.federation.num_clients
    federated = cfg.federation.mode != "centralized"
    if federated and n > len(train):  # a client without data can neither train nor be weighed
        raise UserError(f"{n} clients but {len(train)} training samples (data.max_train_samples = "
                        f"{cfg.data.max_train_samples}): every client needs at least one; lower "
                        "federation.num_clients or raise data.max_train_samples",
                        where="federation.num_clients, data.max_train_samples")
    p = cfg.data.partition
    parts = partition(train_ex, train, cfg.federation.num_clients, p.scheme, p.alpha, ds, p.by,
                      p.bins, p.min_size) if federated else [list(range(len(train)))]
    return Setup(cfg, SplitModel(peft_model), AdapterBank(peft_model), tok, train_ex, val_ex, train, val, parts,
                 device)


def batches_per_client(s: Setup) -> list[int]:
    """Each client's batches per epoch; an epoch has as many global steps as the largest client has."""
    return [math.ceil(len(p) / s.cfg.train.batch_size) for p in s.partitions]


def steps_per_epoch(s: Setup) -> int:
    """An epoch's global steps: the largest client's batches (every client's k-th step is global step k)."""
    return max(batches_per_client(s))


def schedule_of(s: Setup) -> LRSchedule | None:
    """The run's learning-rate schedule (federation/schedule.py) over the epoch's global steps (the
    centralized baseline: one client with every sample)."""
    return lr_schedule(s.cfg.train, steps_per_epoch(s))


def server_schedule_of(s: Setup) -> tuple[LRSchedule | None, int | None]:
    """The server's rate schedule and the global step its adapters freeze at (train.server_epochs; None: never)."""
    spe, t = steps_per_epoch(s), s.cfg.train
    span = t.server_epochs if t.server_decay == "server_epochs" else None  # None: over train.epochs (a hard stop)
    return lr_schedule(t, spe, span), server_frozen_from(t, spe)


def make_server(s: Setup, cuts: dict[int, int], cache_dir: str | None = None,
                weights: dict[int, float] | None = None) -> SplitServer:
    """The server of a run, as simulation and deployment both build it."""
    cfg = s.cfg
    schedule, frozen_from = server_schedule_of(s)
    return SplitServer(s.split, s.bank, cuts, stream_plan(cfg, "server"), lr=cfg.train.lr,
                       weight_decay=cfg.train.weight_decay, server_adapters=cfg.federation.server_adapters,
                       device=s.device, tail_layers=tail_layers(cfg), cache_dir=cache_dir, weights=weights,
                       cut_rank=cfg.model.lora.cut_rank, schedule=schedule, frozen_from=frozen_from,
                       skip_from=skip_from(cfg, steps_per_epoch(s)))


def make_client(s: Setup, cid: int, cut: int, channel) -> SplitClient:
    """Client ``cid`` of a run, as simulation and deployment both build it (federated LoRA: an FLClient,
    whose ``cut`` is the number of blocks)."""
    cfg, t, spe = s.cfg, s.cfg.train, steps_per_epoch(s)
    kind = FLClient if cfg.federation.mode == "fl" else SplitClient
    client = kind(cid, s.split, s.bank, cut, channel, [s.train[i] for i in s.partitions[cid]],
                  stream_plan(cfg, "client"), lr=t.lr, weight_decay=t.weight_decay, batch_size=t.batch_size,
                  pad_id=s.pad_id, seed=t.seed, device=s.device, tail_layers=tail_layers(cfg),
                  cut_rank=cfg.model.lora.cut_rank, schedule=schedule_of(s),
                  server_frozen_from=server_frozen_from(t, spe), skip_from=skip_from(cfg, spe))
    client.noise = act_noise(cfg.privacy, t.seed, cid)  # the privacy defence on act_up (compress/noise.py)
    return client
