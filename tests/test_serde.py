import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitcom.compress.codecs import get_codec
from splitcom.errors import ProtocolError
from splitcom.protocol import serde
from splitcom.protocol.messages import AdapterMsg, ControlMsg, LabelsMsg, SampleTensor, Stream, TensorMsg


def _tensor_msg(lengths=(3, 5), hidden=4, codec="fp32", reuse=()):
    c = get_codec(codec)
    samples = [SampleTensor(100 + i, n, None if i in reuse else c.encode(torch.randn(n, hidden)))
               for i, n in enumerate(lengths)]
    return TensorMsg(Stream.act_up, 7, 42, codec, hidden, samples, scalar=1.25)


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8", "int4"])
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
