import math

import pytest

from splitcom.errors import UserError
from splitcom.fleet.cuts import adaptive_cuts, memory_fit, memory_limits
from splitcom.fleet.devices import DeviceProfile, resolve_devices
from splitcom.fleet.timemodel import ArchSpec, client_memory_bytes

LLAMA = ArchSpec("llama", n_layers=4, hidden=8, intermediate=16, n_heads=2, n_kv_heads=1, vocab=10, seq_len=4)
# SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 kv heads, vocab 49152).
SMOL = ArchSpec("llama", n_layers=30, hidden=576, intermediate=1536, n_heads=9, n_kv_heads=3, vocab=49152,
                seq_len=512)


def _dev(mem: float, name: str = "dev") -> DeviceProfile:
    return DeviceProfile(name=name, flops=1e9, memory_bytes=int(mem), uplink_bps=1e6, downlink_bps=1e6)


def test_memory_fit_picks_the_deepest_cut_that_fits():
    need = [client_memory_bytes(LLAMA, k, 8, 2) for k in range(4)]
    assert need[1] == 8192 and need == sorted(need)
    assert memory_fit(LLAMA, _dev(need[2]), 8, lora_rank=2) == 2  # exactly at the budget fits
    assert memory_fit(LLAMA, _dev(need[2] - 1), 8, lora_rank=2) == 1
    assert memory_fit(LLAMA, _dev(need[3] + 10**6), 8, lora_rank=2) == 3  # never L: the server needs a block
    assert memory_fit(LLAMA, _dev(need[3]), 8, lora_rank=2, reserve_bytes=1) == 2


def test_memory_fit_too_small_names_the_device_and_need():
    with pytest.raises(UserError) as ei:
        memory_fit(LLAMA, _dev(8191, "toaster"), 8, lora_rank=2)
    assert ei.value.where == "federation.devices"
    assert "toaster" in str(ei.value) and f"{8192 / 1024**3:.2f} GiB" in str(ei.value)
    with pytest.raises(UserError):
        memory_fit(ArchSpec("llama", 1, 8, 16, 2, 1, 10), _dev(1e12), 8)


def test_edge_fleet_limits_follow_memory():
    devs = resolve_devices("edge3", 3)  # jetson 14 GiB, pi 7 GiB, phone 4 GiB
    jetson, pi, phone = memory_limits(SMOL, devs, batch_tokens=16 * 512, lora_rank=8)
    assert jetson == 29 and phone < pi < jetson
    # Fewer tokens per batch -> smaller activations -> deeper cuts.
    assert memory_limits(SMOL, devs[2:], batch_tokens=4 * 512, lora_rank=8)[0] > phone


def test_adaptive_rule_moves_by_one():
    # mean 0.7: client 0 beats it, client 1 does not, client 2 ties and stays.
    assert adaptive_cuts([2, 2, 2], [0.9, 0.5, 0.7], True, [4, 4, 4]) == [3, 1, 2]
    # Losses: lower is better.
    assert adaptive_cuts([2, 2, 2], [0.9, 0.5, 0.7], False, [4, 4, 4]) == [1, 3, 2]
    # Clamped to [1, memory max]; a cut above a shrunken limit is pulled down to it.
    assert adaptive_cuts([3, 1, 5], [1.0, 0.0, 1.0], True, [3, 4, 2]) == [3, 1, 2]
    # Identical scores: nobody moves.
    assert adaptive_cuts([2, 3], [0.4, 0.4], True, [4, 4]) == [2, 3]


def test_adaptive_rule_ignores_missing_scores():
    # NaN is left out of the mean (0.5) and keeps its cut.
    assert adaptive_cuts([2, 2, 2], [math.nan, 0.2, 0.8], True, [4, 4, 4]) == [2, 1, 3]
    assert adaptive_cuts([2, 2], [math.nan, math.nan], True, [4, 1]) == [2, 1]


def test_straggler_bound():
    speed = [1.0, 1.0, 5.0, 1.0]

    def step(i: int, k: int) -> float:
        return speed[i] * k

    cuts, scores, limits = [2, 2, 2, 2], [1.0, 1.0, 1.0, 0.0], [4, 4, 4, 4]
    assert adaptive_cuts(cuts, scores, True, limits) == [3, 3, 3, 1]
    # times now [2, 2, 10, 2], median 2, bound 4: client 2 may not grow to 15 s.
    assert adaptive_cuts(cuts, scores, True, limits, step_time=step, straggler_factor=2.0) == [3, 3, 2, 1]
    # ...but a straggler may always shed a layer, even if still above the bound.
    assert adaptive_cuts(cuts, [1.0, 1.0, 0.0, 1.0], True, limits, step, 2.0) == [3, 3, 1, 3]
    # A looser bound (factor 8 -> 16 s) lets it grow.
    assert adaptive_cuts(cuts, scores, True, limits, step, 8.0)[2] == 3


def test_adaptive_rule_input_errors():
    with pytest.raises(ValueError):
        adaptive_cuts([1, 2], [0.1], True, [3, 3])
    with pytest.raises(ValueError):
        adaptive_cuts([1], [0.1], True, [0])
    with pytest.raises(ValueError):
        adaptive_cuts([1], [0.1], True, [3], step_time=lambda i, k: 1.0, straggler_factor=0.5)
