"""Typed run configuration: YAML file + ``--set dotted.key=value`` overrides, validated by pydantic.

The dotted keys are a public contract (issues and external checks use them), so every field is
documented and every validation error is reported as one line naming the offending key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from splitcom.compress.codecs import CODECS
from splitcom.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _at_most(v: int | None, info: ValidationInfo, sibling: str, name: str) -> int | None:
    """A field validator's check that an optional count does not pass its section's ``sibling`` (``name``)."""
    cap = info.data.get(sibling)
    if v is not None and cap is not None and v > cap:
        raise ValueError(f"must be <= {name} ({cap})")
    return v


class LoraCfg(_Strict):
    rank: int = Field(8, ge=1, description="LoRA rank r of every adapted module.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (the update is scaled by alpha/r).")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="LoRA dropout. 0 keeps simulation and deployment bit-identical."
    )
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; None picks the family default (see models/split.py)."
    )
    cut_rank: int | None = Field(
        None, ge=1, description="LoRA rank of the blocks next to each client's cut (both cuts in U-shape); None "
        "uses `rank`. Must be <= rank: a smaller rank there shrinks the adapters sent for those blocks. SFL with "
        "per-client server adapters only; the centralized baseline has no cut and ignores it.")

    @field_validator("cut_rank")
    @classmethod
    def _cut_rank_fits(cls, v: int | None, info: ValidationInfo) -> int | None:
        return _at_most(v, info, "rank", "model.lora.rank")


class ModelCfg(_Strict):
    name: str = Field(
        "smollm2-135m",
        description="HF id, local directory, or a built-in alias: smollm2-135m, tiny-llama, tiny-gpt2, "
        "tiny-qwen2, tiny-mistral.",
    )
    cache_dir: str | None = Field(
        None, description="Where converted weights are cached (default $SPLITCOM_CACHE or ~/.cache/splitcom)."
    )
    lora: LoraCfg = Field(default_factory=LoraCfg)


class SplitCfg(_Strict):
    mode: Literal["standard", "ushape"] = Field(
        "standard", description="`standard`: the server runs everything after the cut and sees labels; "
        "`ushape`: the client also runs the last `tail_layers` blocks, the norm, the LM head and the loss.")
    cut_layer: int = Field(2, description="Client runs embeddings + decoder blocks [0, cut_layer).")
    tail_layers: int = Field(1, ge=1, description="U-shape: blocks [L - tail_layers, L) run on the client.")
    cut_policy: Literal["fixed", "memory_fit", "adaptive"] = Field(
        "fixed", description="`fixed`: every client cuts at cut_layer; `memory_fit`: the deepest cut that fits "
        "each device; `adaptive`: start at cut_layer (within memory), then move cuts between rounds by the "
        "SplitFT rule.")
    straggler_factor: float = Field(2.0, ge=1, description="Adaptive cuts: refuse a move that makes a client's "
                                    "predicted step slower than this times the fleet median.")


class PartitionCfg(_Strict):
    scheme: Literal["iid", "dirichlet", "length_dirichlet"] = Field(
        "iid", description="How training samples are spread over clients."
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller = more skew).")
    by: str = Field("eatType", description="Attribute the `dirichlet` scheme partitions by.")
    bins: int = Field(4, ge=2, description="Quantile bins of token length for `length_dirichlet`.")
    min_size: int = Field(1, ge=1, description="Smallest partition the Dirichlet schemes accept.")


class FieldsCfg(_Strict):
    """Column names of your own data (`jsonl:`, `csv:`, `hf:`); other datasets ignore them."""

    prompt: str = Field("prompt", description="Column holding the input text (the prompt).")
    completion: str = Field(
        "completion", description="Column holding the target text; the loss is on its tokens alone.")
    messages: str | None = Field(
        None, description="Column holding a chat, [{role, content}, ...], used instead of prompt/completion: "
        "the last message must be the assistant's and is the completion; the messages before it are the "
        "prompt, rendered by the tokenizer's chat template (with the generation prompt) when it has one, "
        "else as `role: content` lines ending in `assistant:`. In a CSV cell, the chat is a JSON string.")


class DataCfg(_Strict):
    dataset: str = Field(
        "synthetic", description="`synthetic`, `e2e:DIR` (DIR holds trainset.csv and devset.csv), `webnlg:DIR` "
        "(WebNLG 2017 train/ and dev/ XML), `dart:DIR` (dev only, for evaluation), or your own data: "
        "`jsonl:FILE` (one JSON object per line), `csv:FILE` (a header row) or `hf:DIR` (a `datasets` "
        "save_to_disk directory, or a directory of data files); see `data.fields`."
    )
    max_train_samples: int | None = Field(300, ge=1, description="Cap on training examples (None: all).")
    max_eval_samples: int | None = Field(64, ge=1, description="Cap on validation examples (None: all).")
    max_length: int = Field(128, ge=8, description="Prompt + completion tokens are truncated to this.")
    synthetic_size: int = Field(1200, ge=10, description="Number of synthetic training examples generated.")
    fields: FieldsCfg = Field(default_factory=FieldsCfg)
    eval_file: str | None = Field(
        None, description="Own data: the validation rows come from this second file (same kind and fields as "
        "data.dataset; for `hf:`, a directory, of which the validation/test split is used when it has one).")
    eval_fraction: float | None = Field(
        None, gt=0, lt=1, description="Own data: hold out this fraction of the distinct prompts for validation, "
        "drawn with train.seed (every reference of a prompt lands on the same side). None: the `hf:` "
        "dataset's own validation/test split when it has one, else 0.1. Not together with data.eval_file.")
    partition: PartitionCfg = Field(default_factory=PartitionCfg)
    seed: int | None = Field(
        None, description="Seed of the data itself: which samples are drawn (train and dev subsets, the "
        "synthetic set, the held-out prompts) and how they are split into clients. None: train.seed. Fix it to "
        "repeat a run over training seeds on the same data and the same dev samples.")

    @field_validator("eval_fraction")
    @classmethod
    def _one_dev_source(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("eval_file") is not None:
            raise ValueError("set data.eval_file or data.eval_fraction, not both")
        return v


class FederationCfg(_Strict):
    mode: Literal["sfl", "fl", "centralized"] = Field(
        "sfl", description="`sfl`: split federated; `fl`: federated LoRA, the whole model on every device (only the "
        "adapters travel, FedAvg every round: the baseline SFL is compared with); `centralized`: one PEFT LoRA "
        "model, no split, no federation.")
    num_clients: int = Field(3, ge=1, description="Number of simulated clients.")
    aggregate_every: Literal["epoch"] | int = Field(
        "epoch", description="`epoch`, or a number of round-robin steps between FedAvg aggregations."
    )
    server_adapters: Literal["per_client", "shared", "per_client_copies"] = Field(
        "per_client",
        description="`per_client`: one adapter set per client over one frozen base; `shared`: one set "
        "for all clients (SplitLoRA-style); `per_client_copies`: one whole server model copy per client "
        "(the memory baseline).",
    )
    schedule: Literal["round_robin", "fifo", "random", "longest_tail_first", "exact"] = Field(
        "round_robin", description="Order in which the server serves pending client requests.")
    client_timeout_s: float = Field(60.0, gt=0, description="Deployment: how long the server waits for a "
                                    "client within a round before dropping it from that round.")
    min_clients: int = Field(1, ge=1, description="Deployment: fewest clients a round may aggregate.")
    devices: str | list[str | dict] = Field(
        "local", description="A named fleet (e.g. mixed10, edge3) or a list of device profiles, cycled over "
        "the clients; drives simulated time and memory_fit cuts.")
    server_device: str = Field("cpu-2core@loopback", description="Device profile of the server.")

    @field_validator("aggregate_every")
    @classmethod
    def _positive_steps(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be 'epoch' or a step count >= 1")
        return v


class TrainCfg(_Strict):
    epochs: int = Field(2, ge=1, description="Passes over every client's data.")
    batch_size: int = Field(8, ge=1, description="Samples per client batch.")
    eval_batch_size: int = Field(16, ge=1, description="Samples per validation batch.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate for every adapter.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="The rate over the run, by global step (every client's k-th step of an epoch is "
        "one global step): `constant` (train.lr), or `linear` / `cosine` decay from train.lr, reaching 0 just after "
        "the run's last step, as Hugging Face's schedules of those names. A run with a decay cannot be lengthened exactly.")
    warmup_steps: int = Field(0, ge=0, description="Global steps of linear warm-up from 0 to train.lr, before "
                              "the schedule (any schedule).")
    server_epochs: int | None = Field(
        None, ge=1, description="Split learning: the server's adapters train for this many epochs only (a decaying "
        "train.lr_schedule reaches 0 over them) and are frozen after, while the clients' adapters train on to "
        "train.epochs. A frozen server takes no optimizer step, so its act_down for a reused act_up no longer "
        "drifts (temporal reuse sends nothing for it), and a client sends no grad_up for a sample whose grad_down "
        "would be skipped (U-shape with reused_grad=skip). None: the server trains for train.epochs.")
    server_decay: Literal["server_epochs", "epochs"] = Field(
        "server_epochs", description="With train.server_epochs: the span the server's decaying rate runs over. "
        "`server_epochs`: it reaches 0 at the freeze; `epochs`: it follows the clients' schedule over train.epochs "
        "and the server stops where that schedule stands at the freeze (a hard stop).")
    seed: int = Field(0, description="Seed of model init, shuffling and projections; also of the data and its "
                      "partition unless data.seed is set.")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="Where tensors live.")

    @field_validator("server_epochs")
    @classmethod
    def _server_epochs(cls, v: int | None, info: ValidationInfo) -> int | None:
        return _at_most(v, info, "epochs", "train.epochs")

    @field_validator("server_decay")
    @classmethod
    def _server_decay(cls, v: str, info: ValidationInfo) -> str:
        if v != "server_epochs" and "server_epochs" in info.data and info.data["server_epochs"] is None:
            raise ValueError("applies only with train.server_epochs set (the server otherwise trains for train.epochs)")
        return v


class BangBangCfg(_Strict):
    aggressive: float | dict[str, float] = Field(
        0.99, description="Threshold while val loss keeps improving (a number, or a map by stream).")
    conservative: float | dict[str, float] = Field(
        0.9999, description="Threshold after val loss got worse (a number, or a map by stream).")
    tolerance: float = Field(0.0, ge=0, description="Relative val-loss increase still counted as improving.")
    budget: float | dict[str, float] | None = Field(
        None, description="A byte budget, acted on sample by sample: the repeat sightings of a stream (every "
        "sighting after a sample's first) may cost this fraction of sending them FULL (codec payload bytes, before "
        "the entropy stage), in total over the run. "
        "While val loss keeps improving, the sender uses the aggressive level whenever its repeat sightings so "
        "far cost more than the budget and the conservative one otherwise; after val loss got worse, the "
        "conservative level for the whole epoch. A number in (0, 1], or a map by stream (streams it does not "
        "name have none). None: the level changes once per epoch only.")

    @field_validator("aggressive", "conservative", mode="before")
    @classmethod
    def _levels(cls, v: Any, info: ValidationInfo) -> Any:
        return _per_stream(v, 0.99 if info.field_name == "aggressive" else 0.9999)

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> Any:
        v = _stream_names(v)
        for key, b in (v.items() if isinstance(v, dict) else [("", v)]):
            if b is not None and not 0 < float(b) <= 1:
                raise ValueError(f"{key + ': ' if key else ''}must be in (0, 1] (a fraction of the FULL bytes), "
                                 f"got {b}")
        return v

    def for_stream(self, stream: str) -> dict:
        """The bang-bang controller's options for ``stream`` (the budget is the sender's: ``budget_of``)."""
        return {"aggressive": stream_value(self.aggressive, stream, 0.99),
                "conservative": stream_value(self.conservative, stream, 0.9999), "tolerance": self.tolerance}

    def budget_of(self, stream: str) -> float | None:
        return stream_value(self.budget, stream, None) if self.budget is not None else None


class DDPGCfg(_Strict):
    low: float = Field(0.99, gt=0, lt=1, description="Lowest threshold the agent may pick.")
    high: float = Field(0.9999, gt=0, lt=1, description="Highest threshold the agent may pick.")
    loss_weight: float = Field(1.0, ge=0, description="Reward weight of a relative val-loss increase.")
    noise_std: float = Field(0.5, ge=0, description="Initial exploration noise (action space [-1, 1]).")
    load: str | None = Field(None, description="Warm-start from an agent saved by an earlier run.")


STREAMS = ("act_up", "grad_down", "act_down", "grad_up")
Codec = Literal[tuple(CODECS)]  # every codec name the wire knows (compress/codecs.py)


def _unit_interval(v: float, key: str = "") -> float:
    if not -1 <= v <= 1:
        raise ValueError(f"{key + ': ' if key else ''}must be in [-1, 1]")
    return v


def _stream_names(v: Any) -> Any:
    """A map by stream must name known streams only (other values pass through)."""
    unknown = sorted(set(v) - set(STREAMS)) if isinstance(v, dict) else []
    if unknown:
        raise ValueError(f"unknown stream {unknown[0]!r} (streams: {', '.join(STREAMS)})")
    return v


def _per_stream(v: Any, default: float) -> Any:
    """A number, or a map stream -> number whose unnamed streams take ``default``; names are checked."""
    if isinstance(_stream_names(v), dict):
        return {k: _unit_interval(float(x), k) for k, x in v.items()}
    return _unit_interval(float(v))


def stream_value(v: float | dict[str, float], stream: str, default: float) -> float:
    return v.get(stream, default) if isinstance(v, dict) else v


class TemporalCfg(_Strict):
    enabled: bool = Field(False, description="Temporal reuse: resend a sample's tensor only when it drifted.")
    threshold: float | dict[str, float] = Field(
        0.999, description="REUSE when cos(RP summaries) >= threshold. A number for every stream, or a map by "
        "stream (e.g. {act_up: 0.99, act_down: 0.9999}); streams the map does not name use 0.999.")
    refresh: Literal["full", "delta"] = Field(
        "full", description="What a sample below the threshold sends: `full` (its tensor again) or `delta` "
        "(delta_codec of X minus the tensor the receiver holds, which the receiver adds; the sender keeps an "
        "exact copy of what the receiver holds: T_i x H floats per sample, in `store`).")
    delta_codec: Codec | dict[str, Codec] = Field(
        "int4", description="Codec of DELTA payloads (refresh=delta): one for every stream, or a map by stream "
        "(e.g. {act_down: int2, grad_down: sign1}); streams the map does not name use int4. sign1 (one bit a value) "
        "suits residuals: each DELTA codes what the receiver still lacks, so its error is fed back.")
    projection_dim: int = Field(16, ge=1, description="r: columns of the random projection (<= hidden size).")
    max_reuse_streak: int | None = Field(None, ge=1, description="Force a FULL after this many REUSEs in a row.")
    reused_grad: Literal["apply", "skip"] = Field(
        "apply", description="For a REUSEd activation: apply the gradient computed on the cached tensor, "
        "or skip it (no gradient sent down for that sample).")
    skip_from_epoch: int = Field(
        1, ge=1, description="With reused_grad=skip: the first epoch whose REUSEd activations get no gradient; in "
        "the epochs before it they get theirs as under `apply`, so the client's first blocks train on through them "
        "(1: skip from the start).")
    store: Literal["memory", "disk"] = Field("memory", description="Where the receiver keeps full tensors.")
    summary_of: Literal["source", "decoded"] = Field(
        "source", description="Summarise the tensor before the codec (`source`: a lossy codec's error is not "
        "mistaken for drift) or the decoded tensor the receiver holds (`decoded`, DESIGN 4.3).")
    summary_norm: Literal["none", "channel"] = Field(
        "none", description="`channel`: scale every channel by its RMS over the reference tensor's tokens before "
        "the projection, so the few massive channels of a transformer's hidden state no longer dominate the "
        "cosine (the sender keeps H scales per sample; nothing changes on the wire).")
    controller: Literal["fixed", "bangbang", "ddpg"] = Field(
        "fixed", description="Threshold control per epoch (bang-bang's byte budget acts sample by sample).")
    streams: list[Literal["act_up", "grad_down", "act_down", "grad_up"]] = Field(
        ["act_up"], description="Tensor streams that use temporal reuse (act_down/grad_up exist in U-shape only).")
    bangbang: BangBangCfg = Field(default_factory=BangBangCfg)
    ddpg: DDPGCfg = Field(default_factory=DDPGCfg)

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold_map(cls, v: Any) -> Any:
        return _per_stream(v, 0.999)

    @model_validator(mode="after")
    def _budget_needs_bangbang(self) -> TemporalCfg:
        budget = self.bangbang.budget
        if budget is None:
            return self
        if self.controller != "bangbang" or not self.enabled:
            raise ValueError(f"bangbang.budget switches between bang-bang's two levels of temporal reuse; it needs "
                             f"enabled: true and controller: bangbang (got {self.enabled}, {self.controller!r})")
        off = sorted(set(budget) - set(self.streams)) if isinstance(budget, dict) else []
        if off:
            raise ValueError(f"bangbang.budget names {off}, which do not use temporal reuse (streams: {self.streams})")
        return self

    @field_validator("skip_from_epoch")
    @classmethod
    def _skip_from_needs_skip(cls, v: int, info: ValidationInfo) -> int:
        grad = info.data.get("reused_grad", "skip")
        if v > 1 and grad != "skip":
            raise ValueError(f"{v} says when reused_grad=skip starts; reused_grad is {grad!r} (set reused_grad: "
                             "skip, or leave skip_from_epoch at 1)")
        return v

    def threshold_of(self, stream: str) -> float:
        return stream_value(self.threshold, stream, 0.999)

    def skips_reused_grad(self, epoch: int) -> bool:
        """Whether a REUSEd act_up gets no gradient in ``epoch`` (reused_grad=skip from skip_from_epoch)."""
        return self.enabled and self.reused_grad == "skip" and epoch >= self.skip_from_epoch

    @field_validator("delta_codec", mode="before")
    @classmethod
    def _delta_codec_map(cls, v: Any) -> Any:
        return _stream_names(v)

    def delta_codec_of(self, stream: str) -> str:
        return stream_value(self.delta_codec, stream, "int4")


def _kind_map(v: Any, kind: str, other_key: str) -> Any:
    """A codec map by stream may name only streams of its kind (act_* for `codec`, grad_* for `grad_codec`)."""
    if isinstance(_stream_names(v), dict):
        wrong = sorted(k for k in v if not k.startswith(kind))
        if wrong:
            raise ValueError(f"{wrong[0]} is not an {kind}* stream (set it in compression.{other_key})")
    return v


class CompressionCfg(_Strict):
    codec: Codec | dict[str, Codec] = Field(
        "fp32", description="Codec of activations on the wire: one for act_up and act_down, or a map "
        "(e.g. {act_up: int8, act_down: int8o}); a stream the map does not name uses fp32.")
    grad_codec: Codec | dict[str, Codec] = Field(
        "fp32", description="Codec of gradients on the wire: one for grad_down and grad_up, or a map "
        "(e.g. {grad_up: int8, grad_down: int4}); a stream the map does not name uses fp32.")
    entropy: Literal["none", "zstd"] = Field(
        "none", description="Lossless stage after the codec on every stream, adapters included: `zstd` "
        "compresses each message body (the byte counters count the compressed bytes).")
    prefix: bool = Field(
        False, description="Shared prompt prefixes on act_up: samples whose prompts start with the same "
        "tokens send those activation rows once and reference them by key (exact within a batch; across "
        "batches only when the summary test of temporal reuse passes at the act_up threshold).")
    prefix_refresh: bool = Field(
        False, description="With prefix and temporal.refresh=delta on act_up: a drifted sample's DELTA refresh "
        "shares prompt prefixes too (its prompt rows come from a prefix refreshed earlier, and the DELTA codes "
        "the remaining rows only). Without it a refresh resends the whole prompt, so in long runs refreshes "
        "cost more than first sights.")
    adapter_codec: Codec = Field(
        "fp32", description="Codec of the LoRA matrices exchanged every round (adapters_up/adapters_down); "
        "the server averages the decoded uploads and clients load the decoded download.")
    adapter_refresh: Literal["full", "delta"] = Field(
        "full", description="`delta`: after the first exchange, each round's adapters travel as the change "
        "since what the receiver holds (both ends keep an exact mirror, named by a digest), coded with "
        "`adapter_delta_codec`; `full`: the adapter itself with `adapter_codec`.")
    adapter_delta_codec: Codec = Field("int4", description=(
        "Codec of adapter deltas (adapter_refresh=delta). A client's first upload is already a delta (from the "
        "adapter it was sent), as large as what it learned: sign1 / int2 deltas cost quality where adapters move "
        "(bench/results/stream_distortion.md: one sign1 upload of U-shape's head and tail costs +1.3 % val ppl, int4 +0.01 %)."))
    temporal: TemporalCfg = Field(default_factory=TemporalCfg)

    @field_validator("codec", mode="before")
    @classmethod
    def _act_codecs(cls, v: Any) -> Any:
        return _kind_map(v, "act", "grad_codec")

    @field_validator("grad_codec", mode="before")
    @classmethod
    def _grad_codecs(cls, v: Any) -> Any:
        return _kind_map(v, "grad", "codec")

    @model_validator(mode="after")
    def _prefix_refresh_needs_both(self) -> CompressionCfg:
        t = self.temporal
        if self.prefix_refresh and not (self.prefix and t.enabled and "act_up" in t.streams and t.refresh == "delta"):
            raise ValueError("prefix_refresh shares prompt prefixes in act_up's DELTA refreshes; it needs prefix: "
                             "true and temporal.enabled: true, temporal.refresh: delta with act_up in "
                             f"temporal.streams (got prefix {self.prefix}, enabled {t.enabled}, refresh "
                             f"{t.refresh!r}, streams {t.streams})")
        return self


class LoggingCfg(_Strict):
    progress: bool = Field(True, description="Show a live progress display.")
    log_every: int = Field(1, ge=1, description="Write a `step` record to metrics.jsonl every N steps.")
    tensorboard: bool = Field(False, description="Also write the metrics as TensorBoard scalars to OUT/tensorboard.")
    drift: bool = Field(
        False, description="Measure how far each sent tensor stream really drifts between a sample's sightings "
        "(1 - cos of the tensor itself, also per-channel normalised and against the receiver's copy) and log "
        "median/p90 per epoch in the `reuse` events (simulation). A diagnostic: each sender keeps two float16 "
        "copies of every sample's tensor.")
    keep_epochs: list[int] = Field(
        [], description="Epochs whose checkpoint is kept as OUT/checkpoints/epoch-N.pt after later epochs replace "
        "OUT/checkpoint.pt (a hard link: no extra space until the next epoch's checkpoint is written), so a study "
        "of late epochs can start from them (bench/comm.py --fork-from RUN/checkpoints/epoch-N.pt). [] keeps none.")

    @field_validator("keep_epochs")
    @classmethod
    def _epochs_from_one(cls, v: list[int]) -> list[int]:
        if bad := [e for e in v if e < 1]:
            raise ValueError(f"epochs count from 1; {bad} is not an epoch")
        return sorted(set(v))


class PrivacyCfg(_Strict):
    """A defence against what the server can read from act_up (see ``splitcom audit``)."""

    noise: float = Field(
        0.0, description="Gaussian noise on act_up, added on the client before the codec and temporal reuse: "
        "per token, std noise * ||x_t|| / sqrt(H) per value after clipping (so `noise` is the noise-to-signal "
        "norm ratio of a token); 0: off. Both the server's training and what it can reconstruct see it. SFL only: "
        "the centralized baseline has no wire and ignores it.")
    clip: float | None = Field(
        None, gt=0, description="Clip each act_up token's L2 norm to this before the noise (None: no clipping); "
        "the noise scales with the clipped norm.")

    @field_validator("noise")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not v >= 0 or v == float("inf"):  # NaN fails every comparison
            raise ValueError("must be a finite number >= 0")
        return v


class Config(_Strict):
    model: ModelCfg = Field(default_factory=ModelCfg)
    split: SplitCfg = Field(default_factory=SplitCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    federation: FederationCfg = Field(default_factory=FederationCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    compression: CompressionCfg = Field(default_factory=CompressionCfg)
    logging: LoggingCfg = Field(default_factory=LoggingCfg)
    privacy: PrivacyCfg = Field(default_factory=PrivacyCfg)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UserError(f"cannot set a sub-key of a non-mapping value {nxt!r}", where=key)
        node = nxt
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=3`` -> ("a.b", 3); the value is parsed as YAML so numbers, lists and null work."""
    if "=" not in item:
        raise UserError(f"override {item!r} is not of the form dotted.key=value", where="--set")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"override {item!r} has an empty key", where="--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


_UNION_TAGS = {"float", "int", "str", "bool", "none", "list", "dict"}


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    # a union's members add tags to the location (`literal['fp32',...]`, `dict[str,...]`, `float`): the user
    # wrote a key, so name the key
    key = ".".join(str(p) for p in first["loc"] if not ("[" in str(p) or str(p) in _UNION_TAGS))
    if first["type"] == "extra_forbidden":
        return f"{key}: unknown config key"
    got = first.get("input")
    msg = first["msg"].removeprefix("Value error, ")
    # a section's own check (a model validator) names the values it read, and a per-stream map's check names the
    # bad entry: the dict as written would only repeat the user's keys
    if isinstance(got, dict):
        return f"{key}: {msg}"
    return f"{key}: {msg} (got {got!r})"


# Keys that describe a split (where the model is cut, what crosses the cut, how the server serves the steps):
# federated LoRA (`federation.mode=fl`) has no cut, so one of them set away from its default is a mistake.
SPLIT_ONLY = ("split.", "model.lora.cut_rank", "compression.codec", "compression.grad_codec", "compression.prefix",
              "compression.temporal.", "federation.server_adapters", "federation.schedule", "train.server_epochs",
              "privacy.")  # (privacy.noise acts on act_up, which fl never sends)


def check_mode(cfg: Config) -> Config:
    """``federation.mode=fl`` with a split-only key changed, a centralized run with a server-only one, or a
    skip_from_epoch or keep_epochs past the last epoch: UserError naming the key."""
    if cfg.federation.mode == "centralized" and cfg.train.server_epochs is not None:
        raise UserError("federation.mode=centralized has no server to freeze (leave train.server_epochs at null)",
                        where="train.server_epochs")
    skip_from = cfg.compression.temporal.skip_from_epoch
    if skip_from > cfg.train.epochs:
        raise UserError(f"{skip_from} is after the run's last epoch (train.epochs = {cfg.train.epochs}): no epoch "
                        "would skip (reused_grad=apply says that)", where="compression.temporal.skip_from_epoch")
    if late := [e for e in cfg.logging.keep_epochs if e > cfg.train.epochs]:
        raise UserError(f"{late} after the run's last epoch (train.epochs = {cfg.train.epochs}): no such checkpoint "
                        "is written (the last epoch's is OUT/checkpoint.pt)", where="logging.keep_epochs")
    if cfg.federation.mode == "fl":
        bad = [k for k in config_diff(cfg, Config()) if k.startswith(SPLIT_ONLY)]
        if bad:
            raise UserError(f"only applies to split learning; federation.mode=fl trains the whole model on every "
                            f"device and sends adapters alone (leave {bad[0]} at its default)", where=bad[0])
    return cfg


def build_config(tree: dict | None = None, overrides: list[str] | None = None) -> Config:
    """Validate a raw mapping plus overrides; raise UserError naming the first bad key."""
    tree = dict(tree or {})
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as err:
        raise UserError(_format_error(err)) from None
    return check_mode(cfg)


def data_seed(cfg: Config) -> int:
    """The seed of the data and its partition: data.seed, or train.seed when unset."""
    return cfg.train.seed if cfg.data.seed is None else cfg.data.seed


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (optional) and apply ``--set`` overrides."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError("config file not found", where=str(p))
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise UserError(f"not valid YAML ({getattr(err, 'problem', err)})", where=f"{p}{line}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError("top level must be a mapping of sections", where=str(p))
        tree = loaded
    return build_config(tree, overrides)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (written to OUT/config.yaml; loads back to the same Config)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_diff(a: Config, b: Config, exclude: set[str] | None = None) -> list[str]:
    """The dotted keys whose values differ between two configs (``exclude``: top-level sections to skip)."""
    def flat(tree: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            if isinstance(v, dict) and v:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out
    fa, fb = flat(a.model_dump(exclude=exclude)), flat(b.model_dump(exclude=exclude))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def lengthening_refusal(cfg: Config) -> str | None:
    """Why a run of ``cfg`` cannot be trained on to more epochs exactly (``splitcom run --resume`` with a
    larger train.epochs, and bench/comm.py's --fork-from), or None where it can: with a constant rate no
    rule depends on the number of epochs except DDPG's observation (progress = epoch / epochs)."""
    t = cfg.compression.temporal
    if cfg.federation.mode == "sfl" and t.enabled and t.controller == "ddpg":
        return "a DDPG controller observes progress = epoch / train.epochs"
    if cfg.train.lr_schedule != "constant":
        return f"train.lr_schedule {cfg.train.lr_schedule} decays to 0 over train.epochs"
    return None
