"""Run outputs: ``metrics.jsonl`` (one JSON event per line, flushed as written) and ``summary.json``."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

from splitcom.errors import UserError


class RunLog:
    """metrics.jsonl writer; with ``tensorboard`` set, the same numbers also go to TensorBoard scalars
    (``event/field``, stepped by epoch, or by the running step count for ``step`` events)."""

    def __init__(self, path: Path, append: bool = False, tensorboard: Path | None = None,
                 keep_bytes: int | None = None, replay: list | None = None):
        """``keep_bytes``: resuming from a checkpoint, keep what was logged up to it and append after it
        (what the lost part of the run logged is forgotten); ``replay``: the checkpoint's ``pending`` events,
        written again after it (a crash may have come before they were)."""
        self.path = path
        if keep_bytes is not None:
            with path.open("r+b") as fh:
                fh.truncate(keep_bytes)
        self._fh = path.open("a" if append or keep_bytes is not None else "w", encoding="utf-8")
        self.pending: list[list] = []  # [event, fields] held back until the checkpoint that covers them is saved
        self._tb, self._steps = None, 0
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("needs the tensorboard package (pip install tensorboard)",
                                where="logging.tensorboard") from None
            self._tb = SummaryWriter(str(tensorboard))
        for event, fields in replay or []:
            self.write(event, **fields)

    def write(self, event: str, **fields) -> None:
        self._fh.write(json.dumps({"event": event, **fields}) + "\n")
        self._fh.flush()
        if self._tb is not None:
            self._steps += event == "step"
            step = self._steps if event == "step" else int(fields.get("epoch", fields.get("round", 0)) or 0)
            for key, value in fields.items():
                if isinstance(value, dict):
                    for sub, v in value.items():
                        if isinstance(v, int | float):
                            self._tb.add_scalar(f"{event}/{key}/{sub}", v, step)
                elif isinstance(value, int | float) and not isinstance(value, bool) and key not in ("epoch", "step"):
                    self._tb.add_scalar(f"{event}/{key}", value, step)

    def defer(self, event: str, **fields) -> None:
        """An epoch's closing events wait for its checkpoint: the checkpoint is written first (carrying them),
        then they are (``commit``), so metrics.jsonl never says an epoch finished that ``--resume`` cannot
        find."""
        self.pending.append([event, fields])

    def commit(self) -> None:
        for event, fields in self.pending:
            self.write(event, **fields)
        self.pending = []

    @property
    def size(self) -> int:
        """Bytes written so far (what a checkpoint keeps of the log)."""
        self._fh.flush()
        return self.path.stat().st_size

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def write_json(path: Path, data: dict) -> None:
    """Write atomically so a crash never leaves a half-written file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


RUN_FILES = ("summary.json", "checkpoint.pt", "metrics.jsonl", "config.yaml")


def check_out_dir(out: Path, force: bool) -> None:
    """``--out`` must be a directory (or not exist yet); one that holds a finished or interrupted run is not
    overwritten unless the user says so."""
    if out.exists() and not out.is_dir():
        raise UserError("is a file, not a directory (--out names the run's output directory)", where=str(out))
    held = [f for f in RUN_FILES if (out / f).is_file()]
    if held and not force:
        state = "a finished run" if "summary.json" in held else "an interrupted run"
        raise UserError(f"holds {state} ({', '.join(held)}): pass --resume to go on with it, --force to start "
                        "afresh over it, or another --out", where=str(out))


CHECKPOINT = "checkpoint.pt"  # OUT/checkpoint.pt: what `run --resume` and `server --resume` go on from
KEPT = "checkpoints"  # OUT/checkpoints/epoch-N.pt: the checkpoints of logging.keep_epochs, kept after later epochs


def kept_checkpoint(out: Path, epoch: int) -> Path:
    """Where logging.keep_epochs keeps checkpoint.pt as it stood after ``epoch``: OUT/checkpoints/epoch-N.pt
    (the files beside it that keep_checkpoint copied: OUT/checkpoints/epoch-N-NAME)."""
    return out / KEPT / f"epoch-{epoch}.pt"


def keep_checkpoint(out: Path, epoch: int, keep: list[int], beside: str | None = None) -> None:
    """After ``epoch``'s checkpoint is written: keep it if ``epoch`` is one of ``keep`` (logging.keep_epochs), with
    the files beside it that match the glob ``beside`` (a DDPG agent's zips). checkpoint.pt by a hard link where
    the file system allows (atomic_save replaces it by a rename, so the link goes on naming this epoch's file at
    no cost in space); the others by a copy (their writers write in place)."""
    import shutil

    if epoch not in keep:
        return
    (out / KEPT).mkdir(exist_ok=True)
    dest = kept_checkpoint(out, epoch)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    link_or_copy(out / CHECKPOINT, tmp)
    os.replace(tmp, dest)
    for src in sorted(out.glob(beside)) if beside else []:
        shutil.copy2(src, out / KEPT / f"epoch-{epoch}-{src.name}")


def restore_kept(out: Path, epoch: int, dest: Path) -> None:
    """Put what keep_checkpoint kept of ``out``'s ``epoch`` into run folder ``dest`` under the names a resume reads:
    checkpoint.pt linked (``dest``'s next checkpoint replaces it by a rename), the files beside it copied."""
    import shutil

    link_or_copy(kept_checkpoint(out, epoch), dest / CHECKPOINT)
    for src in (out / KEPT).glob(f"epoch-{epoch}-*"):
        shutil.copy2(src, dest / src.name.removeprefix(f"epoch-{epoch}-"))


def link_or_copy(src: Path, dest: Path) -> None:
    """``dest`` as a hard link to ``src`` (no space; safe for files that are only ever replaced by a rename, as
    atomic_save does, never written in place), else, on another file system or one without links, a copy."""
    import shutil

    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def drop_kept(out: Path) -> None:
    """A run started afresh over ``out`` (--force) keeps no checkpoint of the run it replaces."""
    import shutil

    shutil.rmtree(out / KEPT, ignore_errors=True)


def atomic_save(obj, path: Path) -> None:
    """torch.save through a temporary file and a rename: a crash leaves the previous checkpoint whole."""
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def peak_rss_bytes() -> int:
    """The process's peak resident set: Linux's VmHWM where there is one. Not getrusage's ru_maxrss there:
    Linux carries a parent's peak into a child across fork and exec, so a process started by a big one
    (a benchmark that loaded a model, a test runner) would report that one's peak as its own."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def rss_bytes() -> int:
    """The process's resident set now (peak_rss_bytes is its high-water mark)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def read_metrics(path: Path) -> list[dict]:
    """A run's metrics.jsonl as events; a line that is not JSON raises ValueError naming the file and line."""
    events = []
    with Path(path).open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: not a JSON line ({err.msg})") from err
    return events
