"""Device and link profiles of simulated clients and servers, and named fleets of them.

The time model (``timemodel.py``) turns FLOPs and bytes into seconds with these figures, so the
numbers decide which cut a device gets and how long the server waits for it. Every figure is
traceable: peaks come from vendor datasheets; what a training loop sustains is an *assumed*
fraction of peak, stated beside each profile, because no datasheet gives it.

Units: ``flops`` in FLOP/s, ``memory_bytes`` in bytes, ``*_bps`` in **bits** per second (as links are
sold), ``latency_s`` one-way seconds per message.

A spec names a profile (``raspberry-pi-5``), optionally with a link (``raspberry-pi-5@lte``); a
dict may start from ``base`` and override fields; a fleet name expands to a list of specs.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from splitcom.errors import UserError

WHERE = "federation.devices"
GiB = 1024**3  # DRAM/HBM capacities in datasheets are binary gigabytes
Mbps = 1e6  # link rates are decimal bits per second


class DeviceProfile(BaseModel):
    """What one machine offers a split-learning step: compute, memory and its network link."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    flops: float = Field(gt=0, description="Sustained training FLOP/s at `precision` (not peak).")
    memory_bytes: int = Field(gt=0, description="Bytes the training process may use (after OS/runtime).")
    uplink_bps: float = Field(gt=0, description="Client -> server goodput, bits/s.")
    downlink_bps: float = Field(gt=0, description="Server -> client goodput, bits/s.")
    latency_s: float = Field(0.0, ge=0, description="One-way delay added to every message, seconds.")
    precision: str = Field("fp32", description="Arithmetic `flops` refers to: fp32 (CPUs) or fp16/bf16.")
    note: str = Field("", description="Where the figures come from.")


class Link(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    uplink_bps: float = Field(gt=0)
    downlink_bps: float = Field(gt=0)
    latency_s: float = Field(ge=0)


# Goodput (what TCP delivers), not PHY rate. One-way latency is half the quoted round trip.
LINKS: dict[str, Link] = {
    # Ookla Speedtest Global Index, Sep 2020 global mobile median: 36 down / 11 up Mbit/s, 40 ms RTT;
    # by Jul 2021 the download median was 55 Mbit/s. We take 50 down / 10 up, 20 ms one-way.
    "lte": Link(uplink_bps=10 * Mbps, downlink_bps=50 * Mbps, latency_s=0.020),
    # Ookla, Q3 2021 global 5G medians: 166 down / 21 up Mbit/s. RTT assumed 20 ms.
    "5g": Link(uplink_bps=21 * Mbps, downlink_bps=166 * Mbps, latency_s=0.010),
    # Ookla, Sep 2020 global fixed-broadband median: 86 down / 46 up Mbit/s, 21 ms RTT.
    "broadband": Link(uplink_bps=46 * Mbps, downlink_bps=86 * Mbps, latency_s=0.010),
    # 1x1 802.11ac (the Pi 5's CYW43455 and similar): 433 Mbit/s PHY; ~100 Mbit/s goodput is an
    # assumed typical indoor figure, 3 ms one-way assumed.
    "wifi5": Link(uplink_bps=100 * Mbps, downlink_bps=100 * Mbps, latency_s=0.003),
    # Gigabit Ethernet: ~941 Mbit/s TCP goodput after framing overhead; LAN latency assumed.
    "ethernet-1g": Link(uplink_bps=941 * Mbps, downlink_bps=941 * Mbps, latency_s=0.0003),
    # Data-centre 10 GbE between silos (assumed 9.4 Gbit/s goodput, 0.1 ms).
    "dc-10g": Link(uplink_bps=9400 * Mbps, downlink_bps=9400 * Mbps, latency_s=0.0001),
    # Client and server processes on one host over gRPC/loopback (assumed; memcpy-bound).
    "loopback": Link(uplink_bps=20_000 * Mbps, downlink_bps=20_000 * Mbps, latency_s=0.00005),
}


def _profile(name: str, peak: float, sustained: float, memory_bytes: float, link: str,
             precision: str, note: str) -> DeviceProfile:
    """Build a shipped profile; ``sustained`` is the assumed fraction of the datasheet ``peak``."""
    ln = LINKS[link]
    return DeviceProfile(name=name, flops=peak * sustained, memory_bytes=int(memory_bytes),
                         uplink_bps=ln.uplink_bps, downlink_bps=ln.downlink_bps, latency_s=ln.latency_s,
                         precision=precision,
                         note=f"{note}; sustained = {sustained:.0%} of {peak / 1e12:.3g} TFLOP/s peak "
                              f"(assumed); default link {link}")


PROFILES: dict[str, DeviceProfile] = {p.name: p for p in [
    # NVIDIA Jetson Orin NX 16GB data sheet (DS-10712-001): 1024-core Ampere GPU, 32 Tensor Cores,
    # 918 MHz max, 100 sparse INT8 TOPS (GPU + 2 DLA), 16 GB LPDDR5 shared with the CPU.
    # FP16 tensor peak derived: 8 SM x 918 MHz x 2048 FLOP/clk/SM = 15.0 TFLOP/s dense (FP32 CUDA
    # cores: 1024 x 2 x 0.918 GHz = 1.88 TFLOP/s). 20% sustained: training is bound by the 102 GB/s
    # LPDDR5. Memory: 16 GiB minus ~2 GiB for JetPack/CUDA (assumed).
    _profile("jetson-orin-nx", 15.0e12, 0.20, 14 * GiB, "wifi5", "fp16",
             "NVIDIA Jetson Orin NX 16GB data sheet"),
    # Raspberry Pi 5 product brief: BCM2712, 4x Cortex-A76 @ 2.4 GHz, 8 GB LPDDR4X-4267,
    # 802.11ac Wi-Fi, Gigabit Ethernet. FP32 peak: 4 cores x 2.4 GHz x 16 FLOP/clk (two 128-bit
    # NEON FMA pipes) = 154 GFLOP/s. 25% sustained; 8 GiB minus 1 GiB for the OS (assumed).
    _profile("raspberry-pi-5", 153.6e9, 0.25, 7 * GiB, "wifi5", "fp32",
             "Raspberry Pi 5 product brief (8 GB model)"),
    # A 2023 mid-range Android phone (Snapdragon 7 Gen 3 class, assumed): 1x A715 @ 2.63 GHz +
    # 3x A715 @ 2.4 GHz + 4x A510 @ 1.8 GHz, 8 GB RAM. FP32 peak ~ (2.63 + 3 x 2.4) x 16 +
    # 4 x 1.8 x 8 = 215 GFLOP/s. 20% sustained (thermal throttling); the low-memory killer leaves an
    # app about half of RAM: 4 GiB (assumed).
    _profile("phone-midrange", 215e9, 0.20, 4 * GiB, "lte", "fp32",
             "Arm Cortex-A715/A510 per-core FMA rates, Snapdragon 7 Gen 3 class clocks"),
    # An 8-core x86 laptop with AVX2/FMA (assumed): 8 cores x 3.0 GHz all-core x 32 FP32 FLOP/clk
    # (2 x 256-bit FMA) = 768 GFLOP/s. 25% sustained under a laptop power limit; 16 GB RAM, 12 GiB
    # for training (assumed).
    _profile("laptop-cpu", 768e9, 0.25, 12 * GiB, "broadband", "fp32",
             "x86 AVX2 FMA throughput, 8-core 3 GHz laptop (assumed)"),
    # This development machine: 2 AMD EPYC vCPUs, torch fp32 sgemm measured at 175 GFLOP/s
    # (n=2048, 2 threads); 50% of that sustained in training. 23.5 GiB RAM, 16 GiB budget.
    _profile("cpu-2core", 175e9, 0.50, 16 * GiB, "loopback", "fp32",
             "measured torch sgemm on the 2-vCPU dev box"),
    # NVIDIA Ada (AD102) whitepaper, GeForce RTX 4090: 82.6 TFLOP/s FP32, 165.2 TFLOP/s FP16 tensor
    # with FP32 accumulate (dense), 24 GB GDDR6X. 40% sustained (typical training MFU);
    # 24 GiB minus ~2 GiB CUDA context and allocator slack (assumed).
    _profile("rtx-4090", 165.2e12, 0.40, 22 * GiB, "broadband", "fp16",
             "NVIDIA Ada GPU architecture whitepaper (RTX 4090)"),
    # NVIDIA A100 datasheet, SXM4 80GB: 19.5 TFLOP/s FP32, 312 TFLOP/s BF16 tensor (dense), 80 GB
    # HBM2e. 40% sustained; 76 GiB budget (assumed).
    _profile("a100", 312e12, 0.40, 76 * GiB, "dc-10g", "bf16",
             "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB)"),
    # NVIDIA H100 datasheet, SXM5: 67 TFLOP/s FP32, 989 TFLOP/s BF16 tensor (dense; 1979 sparse),
    # 80 GB HBM3. 40% sustained; 76 GiB budget (assumed).
    _profile("h100", 989e12, 0.40, 76 * GiB, "dc-10g", "bf16",
             "NVIDIA H100 Tensor Core GPU datasheet (SXM5)"),
    # NVIDIA H200 datasheet: the H100 SXM compute with 141 GB HBM3e. 40% sustained; 130 GiB budget.
    _profile("h200", 989e12, 0.40, 130 * GiB, "dc-10g", "bf16",
             "NVIDIA H200 Tensor Core GPU datasheet (SXM)"),
]}

FLEETS: dict[str, list[str]] = {
    # Three heterogeneous edge clients: a GPU board, a single-board CPU, a phone on cellular.
    "edge3": ["jetson-orin-nx@wifi5", "raspberry-pi-5@wifi5", "phone-midrange@lte"],
    # Ten edge clients spanning ~100x in compute and ~100x in uplink, so cut choice and server
    # scheduling both matter.
    "mixed10": [
        "jetson-orin-nx@ethernet-1g", "jetson-orin-nx@wifi5",
        "raspberry-pi-5@ethernet-1g", "raspberry-pi-5@wifi5", "raspberry-pi-5@lte",
        "phone-midrange@5g", "phone-midrange@lte", "phone-midrange@lte",
        "laptop-cpu@broadband", "laptop-cpu@wifi5",
    ],
    # Cross-silo: consumer and data-centre GPUs.
    "silos4": ["rtx-4090@broadband", "a100@dc-10g", "h100@dc-10g", "rtx-4090@ethernet-1g"],
    # Everything on this machine (the default simulation).
    "local": ["cpu-2core@loopback"],
}


def _known() -> str:
    return (f"known profiles: {', '.join(sorted(PROFILES))}; links (name@link): {', '.join(sorted(LINKS))}; "
            f"fleets: {', '.join(sorted(FLEETS))}")


def _from_name(spec: str) -> DeviceProfile:
    base, _, link = spec.strip().partition("@")
    if base not in PROFILES:
        raise UserError(f"unknown device {base!r}; {_known()}", where=WHERE)
    prof = PROFILES[base]
    if not link:
        return prof
    if link not in LINKS:
        raise UserError(f"unknown link {link!r} in {spec!r}; {_known()}", where=WHERE)
    return prof.model_copy(update={"name": f"{base}@{link}", **LINKS[link].model_dump()})


def _from_dict(spec: Mapping[str, Any]) -> DeviceProfile:
    fields = dict(spec)
    base = fields.pop("base", None)
    link = fields.pop("link", None)
    start: dict[str, Any] = {}
    if base is not None:
        start = _from_name(f"{base}@{link}" if link else str(base)).model_dump()
    elif link is not None:
        if link not in LINKS:
            raise UserError(f"unknown link {link!r}; {_known()}", where=WHERE)
        start = LINKS[link].model_dump()
    try:
        return DeviceProfile.model_validate({**start, **fields})
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise UserError(f"device {spec!r}: {key}: {first['msg']}", where=WHERE) from None


def get_profile(spec: str | Mapping[str, Any] | DeviceProfile) -> DeviceProfile:
    """One device from a name, ``name@link``, a dict (``base``/``link`` + overrides) or a profile."""
    if isinstance(spec, DeviceProfile):
        return spec
    if isinstance(spec, str):
        return _from_name(spec)
    if isinstance(spec, Mapping):
        return _from_dict(spec)
    raise UserError(f"a device is a name or a mapping, got {spec!r}", where=WHERE)


def resolve_devices(spec: str | Sequence[str | Mapping[str, Any] | DeviceProfile],
                    num_clients: int) -> list[DeviceProfile]:
    """One profile per client.

    A fleet name or a list shorter than ``num_clients`` is repeated cyclically (so ``"local"`` or a
    single name gives a homogeneous fleet) and a fleet longer than ``num_clients`` is cut to its
    first entries. An explicit list longer than ``num_clients`` is an error: its tail would be
    silently ignored. A string with commas is read as a list.
    """
    if num_clients < 1:
        raise UserError(f"need at least one client, got {num_clients}", where="federation.num_clients")
    items: Sequence[Any]
    if isinstance(spec, str):
        name = spec.strip()
        if name in FLEETS:
            items = FLEETS[name]
        elif "," in name:
            items = [s for s in (p.strip() for p in name.split(",")) if s]
        else:
            items = [name]
    elif isinstance(spec, Sequence):
        items = list(spec)
        if len(items) > num_clients:
            raise UserError(f"{len(items)} devices listed for {num_clients} clients", where=WHERE)
    else:
        raise UserError(f"expected a fleet name or a list of devices, got {spec!r}", where=WHERE)
    if not items:
        raise UserError(f"empty device list; {_known()}", where=WHERE)
    profiles = [get_profile(s) for s in items]
    return list(itertools.islice(itertools.cycle(profiles), num_clients))
