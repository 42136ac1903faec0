import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitcom.compress.codecs import CODECS, get_codec
from splitcom.errors import ProtocolError
from splitcom.protocol import serde
from splitcom.protocol.messages import AdapterMsg, ControlMsg, LabelsMsg, SampleTensor, Stream, TensorMsg


def _tensor_msg(lengths=(3, 5), hidden=4, codec="fp32", reuse=()):
    c = get_codec(codec)
    samples = [SampleTensor(100 + i, n, None if i in reuse else c.encode(torch.randn(n, hidden)))
               for i, n in enumerate(lengths)]
    return TensorMsg(Stream.act_up, 7, 42, codec, hidden, samples, scalar=1.25)


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8", "int4", "int2", "sign1", "int8o", "sign1o"])
def test_tensor_round_trip(codec):
    msg = _tensor_msg(codec=codec, reuse=(1,))
    assert serde.decode(serde.encode(msg)) == msg


def test_tensor_size_is_documented_formula():
    msg = _tensor_msg(lengths=(3, 5, 1), hidden=4)
    assert len(serde.encode(msg)) == 32 + 3 * 17 + (3 + 5 + 1) * 4 * 4
    assert serde.tensor_msg_bytes([3, 5, 1], 4) == len(serde.encode(msg))


def test_other_messages_round_trip():
    labels = LabelsMsg(1, 2, {5: [-100, 3, 4], 9: [1]})
    assert serde.decode(serde.encode(labels)) == labels
    ctrl = ControlMsg(3, 4, "join", {"num_samples": 10})
    assert serde.decode(serde.encode(ctrl)) == ctrl
    ad = AdapterMsg(Stream.adapters_up, 2, 3, 17.0, {"a.lora_A.weight": torch.randn(2, 3), "b": torch.randn(4)})
    back = serde.decode(serde.encode(ad))
    assert (back.stream, back.client_id, back.round, back.weight) == (ad.stream, 2, 3, 17.0)
    for k, v in ad.tensors.items():
        assert torch.equal(back.tensors[k], v)


@pytest.mark.parametrize("codec,bound", [("fp32", 0.0), ("bf16", 2**-8), ("int8", 1 / 254), ("int4", 1 / 14)])
def test_adapter_codecs_size_and_error(codec, bound):
    """Adapter matrices travel through the same codecs; LoRA B ([out, r]) is sent transposed so each
    per-row scale covers a long row. Size: 21-byte extension, then per tensor name + dims + codec bytes."""
    a, b, z = torch.randn(8, 64), torch.randn(32, 8), torch.zeros(8, 5)
    msg = AdapterMsg(Stream.adapters_down, 1, 2, 0.0, {"A": a, "B": b, "Z": z}, cut=3, codec=codec, base=2**64 - 3)
    data = serde.encode(msg)
    c = CODECS[codec]
    header = 16 + 21 + 3 * (2 + 1 + 1 + 2 * 4)
    assert len(data) == header + c.nbytes(8, 64) + c.nbytes(8, 32) + c.nbytes(5, 8)
    back = serde.decode(data)
    assert (back.cut, back.codec, back.stream, back.base) == (3, codec, Stream.adapters_down, 2**64 - 3)
    for name, t in msg.tensors.items():
        rowmax = (t.abs().amax(dim=1, keepdim=True) if name != "B" else t.abs().amax(dim=0, keepdim=True))
        assert back.tensors[name].shape == t.shape
        assert ((back.tensors[name] - t).abs() <= bound * rowmax + 1e-7).all(), name
    if codec == "int8":  # B is [32, 8]: sent as [8, 32], 8 scales instead of 32
        assert c.nbytes(8, 32) < c.nbytes(32, 8)


@pytest.mark.parametrize("codec", ["sign1", "int4o", "sign1o"])
def test_adapter_round_trip_with_sign_and_outlier_codecs(codec):
    """An adapter message decodes to exactly what the codec round trip gives (what both mirrors add)."""
    msg = AdapterMsg(Stream.adapters_up, 1, 2, 3.0, {"A": torch.randn(8, 64), "B": torch.randn(32, 8),
                                                       "Z": torch.zeros(8, 5)}, cut=2, codec=codec, base=7)
    back = serde.decode(serde.encode(msg))
    for name, t in msg.tensors.items():
        assert torch.equal(back.tensors[name], serde.adapter_roundtrip(t, codec)), name
    assert torch.equal(back.tensors["Z"], torch.zeros(8, 5))


def test_errors_name_the_field():
    data = serde.encode(_tensor_msg())
    with pytest.raises(ProtocolError) as e:
        serde.decode(data[:-3])
    assert e.value.field.startswith("samples[1]")
    with pytest.raises(ProtocolError) as e:
        serde.decode(b"XX" + data[2:])
    assert e.value.field == "header.magic"
    with pytest.raises(ProtocolError) as e:
        serde.decode(data + b"\0")
    assert e.value.field == "message"
    bad = bytearray(data)
    bad[16] = 99  # stream byte
    with pytest.raises(ProtocolError) as e:
        serde.decode(bytes(bad))
    assert e.value.field == "stream"


def test_payload_length_must_agree_with_declared_shape():
    msg = _tensor_msg(lengths=(3,))
    msg.samples[0].payload = msg.samples[0].payload[:-4]
    with pytest.raises(ProtocolError) as e:
        serde.decode(serde.encode(msg))
    assert e.value.field == "samples[0].payload_len"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_decode_never_crashes_unexpectedly(data):
    try:
        serde.decode(data)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 400), st.integers(0, 255))
def test_fuzz_flipped_byte_is_rejected_or_decodes(pos, value):
    data = bytearray(serde.encode(_tensor_msg()))
    data[pos % len(data)] = value
    try:
        serde.decode(bytes(data))
    except ProtocolError:
        pass
