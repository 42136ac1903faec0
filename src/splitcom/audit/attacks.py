"""The optimisation attack: input embeddings fitted so the client's head reproduces the observed activations.

The server knows the head (pretrained blocks [0, k) with the client adapters it aggregates), so it can
search for the input that explains what it received: continuous ("soft") token embeddings ``Z [B, T, H]``,
run through the head, pulled by gradient descent towards the observed rows, then each projected to the
token whose embedding is nearest by cosine (as BiSR's optimisation-based attack and the embedding-inversion
attacks before it). No public data is used. The loss is per token ``1 - cos(head(Z)_t, a_t)``, so tokens with
massive-activation channels do not drown the others (on SmolLM2 at cut 2, 4 E2E samples, 100 steps: 68 % of
tokens with the cosine loss, 2 % with a relative squared error).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from splitcom.models.split import GPT2Family, SplitModel, mask_from_lengths, pad


def token_embeddings(split: SplitModel) -> torch.Tensor:
    """[V, H] input embedding table."""
    return split.lm.get_input_embeddings().weight.detach()


def soft_head(split: SplitModel, z: torch.Tensor, lengths: list[int], cut: int) -> torch.Tensor:
    """Blocks [0, cut) on token embeddings ``z`` [B, T, H] instead of token ids (GPT-2 adds its positions)."""
    if isinstance(split.family, GPT2Family):
        pos = torch.arange(z.shape[1], device=z.device)
        z = split.lm.transformer.drop(z + split.lm.transformer.wpe(pos)[None])
    return split.run(z, lengths, 0, cut)


def nearest_tokens(z: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [...] ids of the cosine-nearest rows of ``table`` [V, H]."""
    return (F.normalize(z, dim=-1) @ F.normalize(table, dim=-1).T).argmax(-1)


def optimisation_attack(split: SplitModel, rows: list[torch.Tensor], cut: int, *, steps: int = 100,
                        lr: float = 0.1, batch_size: int = 8, seed: int = 0) -> tuple[list[torch.Tensor], dict]:
    """Per sample observed rows [T_i, H] -> reconstructed token ids [T_i]; and {loss, seconds}."""
    t0 = time.perf_counter()
    table = token_embeddings(split)
    g = torch.Generator().manual_seed(seed)
    mean, std = table.mean(0), table.std(0)
    preds: list[torch.Tensor] = []
    final = []
    for i in range(0, len(rows), batch_size):
        obs = rows[i : i + batch_size]
        lengths = [r.shape[0] for r in obs]
        target = pad(obs).float()  # [B, T, H]
        mask = mask_from_lengths(lengths, target.shape[1]).float()  # [B, T]
        z = (mean + 0.1 * std * torch.randn(target.shape, generator=g)).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        loss = torch.tensor(0.0)
        for _ in range(steps):
            out = soft_head(split, z, lengths, cut)
            loss = ((1 - F.cosine_similarity(out, target, dim=-1)) * mask).sum() / mask.sum()
            (grad,) = torch.autograd.grad(loss, z)  # the model's own parameters get no gradient
            z.grad = grad
            opt.step()
        final.append(float(loss.detach()))
        with torch.no_grad():
            ids = nearest_tokens(z.detach(), table)
        preds += [ids[j, :n] for j, n in enumerate(lengths)]
    return preds, {"cosine_error": sum(final) / max(len(final), 1), "steps": steps,
                   "seconds": time.perf_counter() - t0}
