"""Gaussian noise on act_up: the client's defence against a server that inverts activations.

Applied on the client to each sample's rows before anything else on the stream (codec, temporal reuse,
prefixes), so the summary test of reuse, the codec's scales and the server all see the noisy tensor: what
the server receives and caches is never cleaner than what was noised. Per token the noise scales with the
token's own (clipped) norm, so ``std`` is a noise-to-signal ratio that means the same at every cut, and
tokens with massive-activation channels get proportionally more. The gradient the server sends back is
taken with respect to the noisy tensor and applied to the clean one (the noise is additive, so its
Jacobian is the identity; clipping is treated as the identity too, as DP-SGD-style clipping of
activations usually is).

Not differential privacy: no accounting, and the noise is fresh on every send, so a sample sent FULL in
several epochs gives the server several independent noisy copies to average (temporal reuse sends fewer).
"""

from __future__ import annotations

import math

import torch


class TokenNoise:
    def __init__(self, std: float, clip: float | None = None, seed: int = 0, client_id: int = 0):
        self.std, self.clip = float(std), clip
        # one generator per client, seeded from the config: simulation and deployment draw the same noise
        self.gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(client_id) * 7919 + 20) % 2**63)

    def __call__(self, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per sample ``[T_i, H]`` -> noisy copies (the inputs are not modified)."""
        return [self.apply(r) for r in rows]

    def apply(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        x = x.detach().to("cpu", torch.float32)
        norm = x.norm(dim=-1, keepdim=True)  # [T, 1]
        if self.clip is not None:
            x = x * torch.clamp(self.clip / norm.clamp_min(1e-12), max=1.0)
            norm = norm.clamp_max(self.clip)
        if self.std == 0:
            return x
        noise = torch.randn(x.shape, generator=self.gen)
        return x + noise * (self.std * norm / math.sqrt(x.shape[-1]))


def act_noise(privacy, seed: int, client_id: int) -> TokenNoise | None:
    """The noise a client adds to act_up under ``privacy`` (a PrivacyCfg), or None when it adds none."""
    if privacy is None or (privacy.noise == 0 and privacy.clip is None):
        return None
    return TokenNoise(privacy.noise, privacy.clip, seed, client_id)
