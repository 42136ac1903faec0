"""Split training samples over clients: ``iid``, ``dirichlet`` (by an attribute) and
``length_dirichlet`` (Dirichlet over quantile bins of token length), on flwr-datasets partitioners."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

from splitcom.data.records import Example
from splitcom.data.tokenize import Sample
from splitcom.errors import UserError

datasets.disable_progress_bars()


def _run(partitioner, table: dict, num_clients: int) -> list[list[int]]:
    partitioner.dataset = datasets.Dataset.from_dict(table)
    return [sorted(int(i) for i in partitioner.load_partition(c)["idx"]) for c in range(num_clients)]


def iid(examples, samples, num_clients, alpha, seed, by, bins, min_size) -> list[list[int]]:
    # IidPartitioner shards contiguously without shuffling, so shuffle first.
    order = np.random.default_rng(seed).permutation(len(samples)).tolist()
    return _run(IidPartitioner(num_clients), {"idx": order}, num_clients)


def _dirichlet(labels: Sequence, num_clients, alpha, seed, min_size, key: str) -> list[list[int]]:
    part = DirichletPartitioner(num_clients, partition_by="label", alpha=alpha,
                                min_partition_size=min_size, self_balancing=False, seed=seed)
    try:
        with warnings.catch_warnings():  # flwr warns on every Dirichlet re-draw; the outcome is what matters
            warnings.simplefilter("ignore", UserWarning)
            return _run(part, {"idx": list(range(len(labels))), "label": list(labels)}, num_clients)
    except ValueError as err:
        raise UserError(f"Dirichlet partition failed: {err}", where=key) from None


def dirichlet(examples, samples, num_clients, alpha, seed, by, bins, min_size) -> list[list[int]]:
    labels = [ex.attrs.get(by, "<none>") for ex in examples]
    if all(v == "<none>" for v in labels):
        raise UserError(f"no example has attribute {by!r}", where="data.partition.by")
    return _dirichlet(labels, num_clients, alpha, seed, min_size, "data.partition.alpha")


def length_bins(lengths: Sequence[int], bins: int) -> list[int]:
    """Quantile bin (0..bins-1) of each length; ties at a boundary go to the lower bin."""
    edges = np.quantile(np.asarray(lengths), np.linspace(0, 1, bins + 1)[1:-1])
    return np.searchsorted(edges, np.asarray(lengths), side="left").tolist()


def length_dirichlet(examples, samples, num_clients, alpha, seed, by, bins, min_size) -> list[list[int]]:
    labels = length_bins([len(s.ids) for s in samples], bins)
    return _dirichlet(labels, num_clients, alpha, seed, min_size, "data.partition.alpha")


SCHEMES: dict[str, Callable[..., list[list[int]]]] = {
    "iid": iid, "dirichlet": dirichlet, "length_dirichlet": length_dirichlet,
}


def partition(examples: Sequence[Example], samples: Sequence[Sample], num_clients: int, scheme: str,
              alpha: float = 0.5, seed: int = 0, by: str = "eatType", bins: int = 4,
              min_size: int = 1) -> list[list[int]]:
    """Sample ids per client. Raises UserError if any client would get no sample."""
    if scheme not in SCHEMES:
        raise UserError(f"unknown scheme {scheme!r}; known: {sorted(SCHEMES)}", where="data.partition.scheme")
    if num_clients > len(samples):
        raise UserError(f"{num_clients} clients but only {len(samples)} training samples: "
                        "some client would get no sample", where="federation.num_clients")
    parts = SCHEMES[scheme](examples, samples, num_clients, alpha, seed, by, bins, min_size)
    empty = [c for c, p in enumerate(parts) if not p]
    if empty:
        raise UserError(f"partition leaves client(s) {empty} with no samples", where="data.partition.scheme")
    return parts
