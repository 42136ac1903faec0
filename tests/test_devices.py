import pytest

from splitcom.errors import UserError
from splitcom.fleet.devices import (
    FLEETS,
    LINKS,
    PROFILES,
    DeviceProfile,
    GiB,
    get_profile,
    resolve_devices,
)


def test_shipped_profiles_are_sane():
    for name, p in PROFILES.items():
        assert p.name == name
        assert p.flops > 0 and p.memory_bytes > 0 and p.uplink_bps > 0 and p.downlink_bps > 0
        assert "assumed" in p.note  # every sustained figure says it is an assumption
    # Guards against a unit slip (GFLOP/s typed as TFLOP/s) in any one figure.
    chain = ["h100", "a100", "rtx-4090", "jetson-orin-nx", "laptop-cpu", "cpu-2core", "raspberry-pi-5"]
    flops = [PROFILES[n].flops for n in chain]
    assert flops == sorted(flops, reverse=True)
    assert 1e10 < PROFILES["raspberry-pi-5"].flops < 1e11
    assert 1e14 < PROFILES["h100"].flops < 1e15
    assert PROFILES["phone-midrange"].memory_bytes < PROFILES["raspberry-pi-5"].memory_bytes
    assert PROFILES["h200"].memory_bytes > PROFILES["h100"].memory_bytes
    assert LINKS["lte"].uplink_bps < LINKS["lte"].downlink_bps  # cellular is asymmetric


def test_profiles_are_frozen():
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError on frozen assignment
        PROFILES["h100"].flops = 1.0


def test_every_fleet_resolves():
    for name, specs in FLEETS.items():
        devs = resolve_devices(name, len(specs))
        assert [d.name for d in devs] == specs


def test_mixed10_is_mixed():
    devs = resolve_devices("mixed10", 10)
    assert len(devs) == 10
    assert len({d.uplink_bps for d in devs}) >= 4
    assert len({d.flops for d in devs}) >= 3
    assert max(d.uplink_bps for d in devs) / min(d.uplink_bps for d in devs) > 50


def test_fleet_cycles_and_truncates():
    e = FLEETS["edge3"]
    assert [d.name for d in resolve_devices("edge3", 5)] == [e[0], e[1], e[2], e[0], e[1]]
    assert [d.name for d in resolve_devices("mixed10", 3)] == FLEETS["mixed10"][:3]


def test_single_name_is_homogeneous():
    devs = resolve_devices("raspberry-pi-5", 4)
    assert len(devs) == 4 and all(d == PROFILES["raspberry-pi-5"] for d in devs)


def test_link_suffix_overrides_only_the_link():
    d = get_profile("raspberry-pi-5@lte")
    base = PROFILES["raspberry-pi-5"]
    assert d.name == "raspberry-pi-5@lte"
    assert (d.uplink_bps, d.downlink_bps, d.latency_s) == (LINKS["lte"].uplink_bps, LINKS["lte"].downlink_bps,
                                                          LINKS["lte"].latency_s)
    assert (d.flops, d.memory_bytes) == (base.flops, base.memory_bytes)


def test_comma_string_and_list_of_names_and_dicts():
    assert [d.name for d in resolve_devices("h100, a100", 3)] == ["h100", "a100", "h100"]
    custom = {"name": "board", "flops": 1e9, "memory_bytes": 2 * GiB, "uplink_bps": 1e6, "downlink_bps": 2e6}
    devs = resolve_devices(["a100", {"base": "phone-midrange", "memory_bytes": GiB, "link": "5g"}, custom], 3)
    assert devs[0] is PROFILES["a100"]
    assert devs[1].memory_bytes == GiB and devs[1].flops == PROFILES["phone-midrange"].flops
    assert devs[1].uplink_bps == LINKS["5g"].uplink_bps
    assert devs[2] == DeviceProfile(**custom)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UserError) as ei:
        resolve_devices("jetson-nano-9000", 2)
    assert ei.value.where == "federation.devices"
    msg = str(ei.value)
    assert "jetson-nano-9000" in msg and "raspberry-pi-5" in msg and "mixed10" in msg and "lte" in msg
    with pytest.raises(UserError, match="unknown link 'carrier-pigeon'"):
        resolve_devices(["h100@carrier-pigeon"], 1)
    with pytest.raises(UserError, match="unknown device 'nope'"):
        resolve_devices([{"base": "nope"}], 1)


def test_bad_specs_are_user_errors():
    with pytest.raises(UserError, match="flops"):
        resolve_devices([{"base": "h100", "flops": -1}], 1)
    with pytest.raises(UserError, match="colour"):
        resolve_devices([{"base": "h100", "colour": "red"}], 1)
    with pytest.raises(UserError, match="3 devices listed for 2 clients"):
        resolve_devices(["h100", "a100", "h100"], 2)
    with pytest.raises(UserError):
        resolve_devices([], 2)
    with pytest.raises(UserError):
        resolve_devices("h100", 0)
