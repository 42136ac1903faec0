"""Simulated wall clock: what the run would take on the configured devices and links.

Per round-robin step, every client's job is (arrival = head forward + upload, service = server
forward + backward, tail = download + client backward), with FLOPs from the time model and the bytes
each client *actually* sent and received in that step; the server serves one job at a time in the
order of ``federation.schedule`` and the step's makespan advances the clock. Aggregation adds the
slowest client's adapter upload and download. U-shape is modelled with the client's tail blocks,
norm and LM head in its backward phase, and both server halves as one service.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from splitcom.fleet.devices import DeviceProfile, get_profile, resolve_devices
from splitcom.fleet.schedule import Job, make_schedule, simulate
from splitcom.fleet.timemodel import (
    ArchSpec,
    arch_from_hf_config,
    compute_time,
    layer_flops,
    lm_head_flops,
    transfer_time,
)


@dataclass
class SimClock:
    arch: ArchSpec
    devices: list[DeviceProfile]  # one per client
    server: DeviceProfile
    schedule: str = "round_robin"
    seed: int = 0
    lora_rank: int = 0
    now: float = 0.0  # simulated seconds since the start
    step_makespans: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.policy = make_schedule(self.schedule, self.seed)

    @classmethod
    def from_config(cls, cfg, hf_config, num_clients: int) -> SimClock:
        arch = arch_from_hf_config(hf_config, seq_len=cfg.data.max_length)
        return cls(arch, resolve_devices(cfg.federation.devices, num_clients),
                   get_profile(cfg.federation.server_device), cfg.federation.schedule, cfg.train.seed,
                   cfg.model.lora.rank)

    def _flops(self, n_layers: int, tokens: int, seq_len: int, head: bool) -> tuple[float, float]:
        f, b = layer_flops(self.arch, tokens, seq_len, self.lora_rank)
        f, b = f * n_layers, b * n_layers
        if head:
            hf, hb = lm_head_flops(self.arch, tokens)
            f, b = f + hf, b + hb
        return f, b

    def job(self, cid: int, cut: int, tail: int, tokens: int, seq_len: int, up: int, down: int) -> Job:
        """One client's step as a scheduling job; ``tail`` = blocks the client runs at the end (U-shape)."""
        dev = self.devices[cid]
        server_layers = self.arch.n_layers - cut - tail
        cf, cb = self._flops(cut, tokens, seq_len, head=False)
        tf, tb = self._flops(tail, tokens, seq_len, head=tail > 0)
        sf, sb = self._flops(server_layers, tokens, seq_len, head=tail == 0)
        return Job(cid, arrival=compute_time(cf, dev) + transfer_time(up, dev.uplink_bps, dev.latency_s),
                   service=compute_time(sf + sb, self.server),
                   tail=transfer_time(down, dev.downlink_bps, dev.latency_s) + compute_time(cb + tf + tb, dev))

    def step(self, jobs: list[Job]) -> float:
        if not jobs:
            return 0.0
        makespan = simulate(jobs, self.policy).makespan
        self.step_makespans.append(makespan)
        self.now += makespan
        return makespan

    def aggregation(self, up: dict[int, int], down: dict[int, int]) -> float:
        """All clients upload in parallel, the server averages, all download in parallel."""
        t_up = max((transfer_time(n, self.devices[c].uplink_bps, self.devices[c].latency_s)
                    for c, n in up.items()), default=0.0)
        t_down = max((transfer_time(n, self.devices[c].downlink_bps, self.devices[c].latency_s)
                      for c, n in down.items()), default=0.0)
        self.now += t_up + t_down
        return t_up + t_down
