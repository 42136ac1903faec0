"""Federated LoRA (``federation.mode=fl``), the baseline split learning is weighed against: every device
holds the whole model and trains LoRA on all of its blocks over its own shard, and only the adapters
travel, once per round, to the same weighted FedAvg as SFL.

An FL client is a split client whose cut is past the last block: it owns every block's adapter (so the
adapter upload, download, deltas, codecs, checkpoint and resume are SFL's own code), and its step is the
centralized baseline's step on its own adapter, so nothing crosses the network between rounds. The
server is SFL's with no blocks to serve for it: it averages and sends adapters down, and refuses step
traffic.
"""

from __future__ import annotations

from splitcom.data.tokenize import Batch
from splitcom.federation.centralized import local_step
from splitcom.federation.client import SplitClient


class FLClient(SplitClient):
    """A client that trains the whole model locally; ``cut`` is the number of decoder blocks."""

    def train_step(self, batch: Batch, step: int) -> float:
        """One local LoRA step on blocks [0, L) + norm + LM head (``step`` only numbers SFL's messages)."""
        self.bank.activate(self.adapter, self.layers)
        self.tokens_forwarded += batch.num_tokens
        if self.schedule is not None:
            self.schedule.apply(self.optimizer, step)
        return local_step(self.split.model, self.optimizer, batch, self.device)
