import pytest
import torch

from splitcom.compress.codecs import CODECS, get_codec
from splitcom.errors import ProtocolError


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (16, 64)])
def test_exact_sizes(name, shape):
    c = get_codec(name)
    x = torch.randn(*shape)
    assert len(c.encode(x)) == c.nbytes(*shape)


def test_expected_byte_counts():
    assert get_codec("fp32").nbytes(10, 64) == 2560
    assert get_codec("fp16").nbytes(10, 64) == 1280
    assert get_codec("bf16").nbytes(10, 64) == 1280
    assert get_codec("int8").nbytes(10, 64) == 40 + 640
    assert get_codec("int4").nbytes(10, 64) == 40 + 320
    assert get_codec("int4").nbytes(1, 3) == 4 + 2  # odd count: the last byte holds one value
    assert get_codec("int2").nbytes(10, 64) == 40 + 160
    assert get_codec("int2").nbytes(1, 5) == 4 + 2  # four values a byte, the last byte partly used


@pytest.mark.parametrize("name,bound", [("fp32", 0.0), ("fp16", 2**-11), ("bf16", 2**-8),
                                        ("int8", 0.5 / 127), ("int4", 0.5 / 7), ("int2", 0.5)])
def test_round_trip_error_bounds(name, bound):
    torch.manual_seed(0)
    # rows spanning four decades, kept away from fp16's subnormal range (below 6e-5)
    x = torch.randn(12, 33).sign() * (torch.rand(12, 33) + 0.5) * torch.logspace(-2, 2, 12)[:, None]
    y = get_codec(name).decode(get_codec(name).encode(x), 12, 33)
    if name.startswith("int"):  # absolute error <= half a step of the row's absmax scale
        err = (y - x).abs().amax(dim=1) / x.abs().amax(dim=1)
    else:  # relative error of a float format
        err = ((y - x).abs() / x.abs().clamp_min(1e-30)).amax()
    assert float(err.max()) <= bound * 1.0001


def test_int_codecs_keep_zero_rows_and_signs():
    x = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.5, 1.0]])
    for name in ("int8", "int4", "int2", "int4s", "int2s"):
        y = get_codec(name).decode(get_codec(name).encode(x), 2, 3)
        assert torch.equal(y[0], torch.zeros(3))
        assert y[1, 0] == -1.0 and y[1, 2] == 1.0


@pytest.mark.parametrize("name", ["int4s", "int2s"])
def test_stochastic_rounding_is_unbiased_deterministic_and_within_a_step(name):
    """Nearest int2 turns 0.3 of the absmax into 0 every time; stochastic rounding sends the absmax with
    probability 0.3, so the mean is kept. The same tensor always gives the same bytes (seeded by its CRC)."""
    c, near = get_codec(name), get_codec(name[:-1])
    x = torch.full((4, 20001), 0.3)
    x[:, 0] = 1.0  # absmax 1: the step is 1 / qmax
    x[1] *= -1
    x[3, 1:] = torch.linspace(-1, 1, 20000)
    assert c.encode(x) == c.encode(x.clone()) and c.nbytes(4, 20001) == near.nbytes(4, 20001)
    y = c.decode(c.encode(x), 4, 20001)
    step = 1 / near.qmax
    assert float((y - x).abs().max()) <= step * 1.0001  # one step, not half a step
    assert torch.allclose(y * near.qmax, torch.round(y * near.qmax), atol=1e-4)  # on the grid
    for row in range(3):  # the mean survives: 20000 draws, standard error <= 0.5 step / sqrt(20000)
        assert abs(float(y[row, 1:].mean() - x[row, 1:].mean())) < 0.02 * step
    assert abs(float((y[3, 1:] - x[3, 1:]).mean())) < 0.02 * step
    if name == "int2s":
        assert float(near.decode(near.encode(x), 4, 20001)[0, 1:].abs().max()) == 0.0  # nearest: all lost
    other = c.decode(c.encode(x + 1e-7), 4, 20001)  # another tensor, another draw
    assert not torch.equal(other, y)


def test_wrong_length_is_protocol_error():
    c = get_codec("int8")
    with pytest.raises(ProtocolError):
        c.decode(b"\0" * 5, 2, 3)


def test_adapter_codec_end_to_end(tmp_path):
    """int8 on the round's adapter exchange: about a quarter of the fp32 bytes, the same activations, and
    training still converges to nearly the same validation loss."""
    from conftest import tiny_cfg

    from splitcom.federation.simulation import run

    over = {"train.epochs": 2, "federation.num_clients": 3}
    fp32 = run(tiny_cfg(**over), tmp_path / "fp32", progress=False)
    int8 = run(tiny_cfg(**over, **{"compression.adapter_codec": "int8"}), tmp_path / "int8", progress=False)
    for stream in ("adapters_up", "adapters_down"):
        ratio = int8["bytes_by_stream"][stream] / fp32["bytes_by_stream"][stream]
        assert 0.25 < ratio < 0.35, (stream, ratio)  # 1 byte a value + one fp32 scale per row, plus names
    assert int8["bytes_by_stream"]["act_up"] == fp32["bytes_by_stream"]["act_up"]
    assert int8["val_loss"] < int8["initial_val_loss"]
    assert abs(int8["val_loss"] - fp32["val_loss"]) < 0.02 * fp32["val_loss"]


def test_int2_packs_four_values_a_byte_lowest_bits_first():
    x = torch.tensor([[1.0, -1.0, 0.0, 1.0, -1.0]])  # codes 1, 3 (-1), 0, 1 | 3
    data = get_codec("int2").encode(x)
    assert data[4:] == bytes([1 | 3 << 2 | 0 << 4 | 1 << 6, 3])
    assert torch.equal(get_codec("int2").decode(data, 1, 5), x)


def test_sign1_packs_eight_signs_a_byte_with_the_mean_absolute_scale():
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0, -0.5, -1.0, 2.0, 0.0, -4.0], [0.0] * 9])
    c = get_codec("sign1")
    data = c.encode(x)
    assert c.nbytes(2, 9) == 8 + 3 == len(data)  # two fp32 scales, 18 bits in three bytes
    # row 0: signs + - + + - - + + (0 counts as +) | -, lowest bit first; row 1 all zero: every bit set
    assert data[8:] == bytes([0b11001101, 0b11111110, 0b00000011])
    y = c.decode(data, 2, 9)
    s = x[0].abs().mean()
    assert torch.allclose(y[0], torch.where(x[0] >= 0, s, -s))
    assert torch.equal(y[1], torch.zeros(9))  # a zero row's scale is 0


def test_sign1_scale_minimises_the_squared_error():
    torch.manual_seed(1)
    x = torch.randn(4, 200) * torch.tensor([[0.1], [1.0], [10.0], [3.0]])
    y = get_codec("sign1").decode(get_codec("sign1").encode(x), 4, 200)
    err = (y - x).pow(2).sum(dim=1)
    for f in (0.9, 1.1):  # any other scale of the same signs is worse
        assert torch.all((f * y - x).pow(2).sum(dim=1) > err)


@pytest.mark.parametrize("name,bits", [("int8o", 8), ("int4o", 4), ("int2o", 2)])
def test_outlier_codecs_keep_the_largest_values_exactly(name, bits):
    """A massive-activation channel sets no step: the other values keep the precision of their own absmax."""
    from splitcom.compress.codecs import OUTLIERS

    torch.manual_seed(2)
    x = torch.randn(6, 40)
    x[:, 7] = 3000.0  # one massive channel
    x[:, 31] = -torch.linspace(200, 500, 6)  # another, different per token
    c = get_codec(name)
    data = c.encode(x)
    assert len(data) == c.nbytes(6, 40) == get_codec(name[:-1]).nbytes(6, 40) + 6 * OUTLIERS * 6
    y = c.decode(data, 6, 40)
    top = x.abs().topk(OUTLIERS, dim=1).indices
    assert torch.equal(y.gather(1, top), x.gather(1, top))  # outliers travel exactly
    rest = x.scatter(1, top, 0.0)
    step = rest.abs().amax(dim=1) / (2 ** (bits - 1) - 1)
    assert torch.all((y - x).abs().amax(dim=1) <= step / 2 * 1.0001)
    plain = get_codec(name[:-1]).decode(get_codec(name[:-1]).encode(x), 6, 40)
    others = torch.ones(40, dtype=torch.bool)
    others[[7, 31]] = False
    # the plain codec rounds every other value to 0 here (relative error 1); int2 keeps only {-1, 0, 1} steps
    assert (y - x)[:, others].norm() < {8: 0.02, 4: 0.2, 2: 0.7}[bits] * (plain - x)[:, others].norm()


def test_sign1o_and_short_rows():
    x = torch.tensor([[5.0, -1.0, 2.0]])  # fewer values than OUTLIERS: every value kept exactly
    c = get_codec("sign1o")
    assert torch.equal(c.decode(c.encode(x), 1, 3), x)


def test_outlier_column_out_of_range_is_protocol_error():
    c = get_codec("int4o")
    data = bytearray(c.encode(torch.randn(2, 8)))
    n = get_codec("int4").nbytes(2, 8)
    data[n:n + 2] = (9).to_bytes(2, "little")  # column 9 of a row of 8
    with pytest.raises(ProtocolError, match="outlier column 9"):
        c.decode(bytes(data), 2, 8)
