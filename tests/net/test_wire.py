"""Wire frames: round trips, hidden-state dtype choice, every malformed input, and a decode fuzz."""
import json
import random
import struct

import pytest
import torch

from dllm.net import wire
from dllm.net.wire import (
    DTYPE_CODES,
    Frame,
    FrameKind,
    HiddenOverflowError,
    NonFiniteError,
    WireError,
    decode,
    encode,
    pack_hidden,
    unpack_hidden,
)

# Decoding read-only ``bytes`` is allowed (the tensor then aliases immutable memory); torch warns once.
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")


def random_meta(rng: random.Random, depth: int = 0):
    def value():
        kind = rng.randrange(8 if depth < 3 else 6)
        if kind == 0:
            return rng.randint(-2**62, 2**62)
        if kind == 1:
            return rng.uniform(-1e6, 1e6)
        if kind == 2:
            return "".join(rng.choice("abcé中🙂\"\\\n ") for _ in range(rng.randrange(6)))
        if kind == 3:
            return rng.choice([True, False, None])
        if kind in (4, 5):
            return rng.randrange(100)
        if kind == 6:
            return [value() for _ in range(rng.randrange(4))]
        return random_meta(rng, depth + 1)
    return {f"k{i}{rng.choice(['', 'é', ' '])}": value() for i in range(rng.randrange(5))}


def random_tensor(rng: random.Random, gen: torch.Generator):
    dtype = rng.choice(list(DTYPE_CODES))
    if rng.random() < 0.6:
        shape = (rng.choice([0, 1, 1, 2, 3, 7]), rng.randrange(1, 97))  # hidden [T, H], T = 0 included
    else:
        shape = tuple(rng.randrange(0, 5) for _ in range(rng.randrange(0, 5)))
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen, dtype=torch.float32) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)


def assert_same(a: Frame, b: Frame):
    assert b.kind == a.kind and isinstance(b.kind, FrameKind)
    assert b.meta == a.meta
    if a.tensor is None:
        assert b.tensor is None
    else:
        assert b.tensor.dtype == a.tensor.dtype and b.tensor.shape == a.tensor.shape
        assert torch.equal(b.tensor, a.tensor)


# ---------------------------------------------------------------- round trips
def test_roundtrip_random_frames():
    rng, gen = random.Random(1234), torch.Generator().manual_seed(1234)
    for _ in range(300):
        tensor = random_tensor(rng, gen) if rng.random() < 0.85 else None
        frame = Frame(rng.choice(list(FrameKind)), random_meta(rng), tensor)
        data = encode(frame)
        assert_same(frame, decode(bytearray(data)))
        assert_same(frame, decode(data))
        assert_same(frame, decode(memoryview(data)))


def test_roundtrip_hidden_rows_through_pack():
    rng, gen = random.Random(7), torch.Generator().manual_seed(7)
    for _ in range(200):
        T, H = rng.choice([0, 1, 2, 5, 16]), rng.choice([1, 8, 64, 576, 2048])
        x = torch.randn(T, H, generator=gen) * rng.choice([1.0, 100.0])
        packed = pack_hidden(x)
        back = decode(bytearray(encode(Frame(FrameKind.FORWARD, {"session": "s", "step": 3}, packed))))
        assert back.tensor.dtype == torch.float16 and back.tensor.shape == (T, H)
        y = unpack_hidden(back.tensor, torch.float32)
        assert y.dtype == torch.float32 and torch.allclose(y, x, rtol=1e-3, atol=1e-3)


def test_layout_matches_docstring():
    t = torch.arange(6, dtype=torch.float16).view(2, 3)
    data = encode(Frame(FrameKind.FORWARD, {"a": 1}, t))
    assert data[:4] == b"DLLM" and data[4] == 1 and data[5] == FrameKind.FORWARD and data[6] == 1 and data[7] == 2
    assert struct.unpack_from("<2I", data, 8) == (2, 3)
    meta_len = struct.unpack_from("<I", data, 16)[0]
    assert json.loads(data[20:20 + meta_len]) == {"a": 1} and data[20:27] == b'{"a":1}'
    assert (20 + meta_len) % wire.PAYLOAD_ALIGN == 0
    assert data[20 + meta_len:] == t.numpy().astype("<f2").tobytes()


def test_tensorless_frame_has_no_padding():
    data = encode(Frame(FrameKind.PING, {"t": 1}))
    assert data == b"DLLM\x01\x07\x00\x00" + struct.pack("<I", 7) + b'{"t":1}'


def test_decode_is_zero_copy_and_writable_over_bytearray():
    buf = bytearray(encode(Frame(FrameKind.RESULT, {}, torch.ones(2, 4, dtype=torch.float16))))
    t = decode(buf).tensor
    t[0, 0] = 5.0                          # writes land in the received buffer: no copy was made
    assert decode(buf).tensor[0, 0] == 5.0


def test_payload_is_aligned_in_a_sealed_plaintext():
    from dllm.net.crypto import Identity, SecureChannel
    a, b = Identity.generate(), Identity.generate()
    tx, rx = SecureChannel(a, b.public_key, b"\x00" * 15, True), SecureChannel(b, a.public_key, b"\x00" * 15, False)
    for meta in ({}, {"x": "y" * 5}, {"s": 1}):
        t = decode(rx.open(tx.seal(encode(Frame(FrameKind.FORWARD, meta, torch.zeros(1, 8)))))).tensor
        assert t.data_ptr() % 4 == 0


def test_unaligned_payload_from_a_foreign_encoder_is_copied():
    t = torch.arange(4, dtype=torch.float32)
    meta = b"{}"  # no padding: payload starts at 8 + 4 + 4 + 2 = 18, not a multiple of 4
    data = b"DLLM\x01\x02\x03\x01" + struct.pack("<I", 4) + struct.pack("<I", 2) + meta + t.numpy().tobytes()
    got = decode(data).tensor
    assert torch.equal(got, t) and got.data_ptr() % 4 == 0


def test_scalar_and_empty_tensors():
    for t in (torch.tensor(3.5), torch.zeros(0, 5120, dtype=torch.float16), torch.zeros(3, 0, dtype=torch.int64)):
        assert_same(Frame(FrameKind.RESULT, {}, t), decode(encode(Frame(FrameKind.RESULT, {}, t))))


def test_non_contiguous_tensor_is_sent_contiguous():
    t = torch.arange(12, dtype=torch.float32).view(3, 4).t()
    assert torch.equal(decode(encode(Frame(FrameKind.FORWARD, {}, t))).tensor, t)


# ---------------------------------------------------------------- hidden dtype choice
@pytest.mark.parametrize("value, dtype", [
    (1.0, torch.float16), (65504.0, torch.float16), (-65504.0, torch.float16),
    (65505.0, torch.bfloat16),         # |x| > 65504: the rule is fp16's range, not its rounding
    (65520.0, torch.bfloat16),         # would round to inf in fp16
    (7e4, torch.bfloat16), (-7e4, torch.bfloat16), (1e38, torch.bfloat16),
    (3.4e38, torch.float32),           # finite in fp32, inf in bf16 (max 3.39e38)
])
def test_pack_hidden_picks_narrowest_finite_dtype(value, dtype):
    x = torch.randn(2, 16)
    x[1, 3] = value
    packed = pack_hidden(x)
    assert packed.dtype == dtype and bool(torch.isfinite(packed).all())
    data = encode(Frame(FrameKind.FORWARD, {}, packed))
    assert data[6] == {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}[dtype]  # dtype code in the header
    assert decode(data).tensor.dtype == dtype


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 1e39])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_hidden_refuses_non_finite_input(value, dtype):
    x = torch.zeros(3, 8, dtype=torch.float64)
    x[2, 5] = value
    x = x.to(dtype)  # 1e39 is already inf once it is fp32 / bf16 / fp16
    with pytest.raises(NonFiniteError, match=r"first at index \[2, 5\]"):
        pack_hidden(x)


def test_pack_hidden_refuses_beyond_fp32_range():
    x = torch.zeros(1, 4, dtype=torch.float64)
    x[0, 1] = 1e39  # finite in fp64 only
    with pytest.raises(HiddenOverflowError, match="beyond fp32"):
        pack_hidden(x)


def test_pack_hidden_inputs():
    assert pack_hidden(torch.ones(1, 4, dtype=torch.bfloat16)).dtype == torch.float16
    assert pack_hidden(torch.zeros(0, 4)).dtype == torch.float16
    with pytest.raises(WireError, match="floating-point"):
        pack_hidden(torch.ones(2, dtype=torch.int64))
    with pytest.raises(WireError, match="floating-point"):
        pack_hidden([1.0])


def test_unpack_hidden_casts_to_compute_dtype():
    t = torch.ones(1, 4, dtype=torch.float16)
    assert unpack_hidden(t, torch.bfloat16).dtype == torch.bfloat16
    assert unpack_hidden(t, torch.float32, "cpu").dtype == torch.float32


# ---------------------------------------------------------------- encode errors
@pytest.mark.parametrize("frame, match", [
    (Frame(FrameKind.PING, [1, 2]), "must be a dict"),
    (Frame(FrameKind.PING, {"x": float("nan")}), "plain JSON"),
    (Frame(FrameKind.PING, {"x": {1, 2}}), "plain JSON"),
    (Frame(FrameKind.PING, {"x": torch.ones(1)}), "plain JSON"),
    (Frame(99, {}), "unknown frame kind"),
    (Frame(FrameKind.FORWARD, {}, torch.ones(2, dtype=torch.complex64)), "cannot cross the wire"),
    (Frame(FrameKind.FORWARD, {}, torch.ones(2, dtype=torch.bool)), "cannot cross the wire"),
    (Frame(FrameKind.FORWARD, {}, torch.ones([1] * 9)), "exceeds the wire limits"),
    (Frame(FrameKind.FORWARD, {}, [1.0]), "torch.Tensor"),
])
def test_encode_errors(frame, match):
    with pytest.raises(WireError, match=match):
        encode(frame)


def test_encode_respects_cap():
    with pytest.raises(WireError, match="over the 1000-byte cap"):
        encode(Frame(FrameKind.FORWARD, {}, torch.zeros(1, 5120, dtype=torch.float16)), max_bytes=1000)


# ---------------------------------------------------------------- decode errors
GOOD = encode(Frame(FrameKind.FORWARD, {"session": "abc", "positions": [0, 1]}, torch.ones(2, 3, dtype=torch.float16)))


def header(kind=2, code=1, dims=(2, 3), meta=b"{}", payload=None, magic=b"DLLM", version=1, ndim=None):
    ndim = len(dims) if ndim is None else ndim
    head = magic + bytes([version, kind, code, ndim]) + struct.pack(f"<{len(dims)}I", *dims)
    if payload is None:
        payload = bytes(2 * 6)
    return head + struct.pack("<I", len(meta)) + meta + payload


def test_header_helper_builds_valid_frames():
    assert decode(header()).tensor.shape == (2, 3)


@pytest.mark.parametrize("data, match", [
    (b"", "shorter than"),
    (b"DLLM\x01\x02\x01", "shorter than"),
    (header(magic=b"DLLX"), "bad magic"),
    (header(version=2), "wire version 2"),
    (header(version=0), "wire version 0"),
    (header(kind=0), "unknown frame kind 0"),
    (header(kind=200), "unknown frame kind 200"),
    (header(code=77), "unknown dtype code 77"),
    (header(code=0, payload=b""), "no shape without a tensor"),
    (header(dims=(1,) * 9, payload=b"\x00\x00"), "bad ndim 9"),
    (header(dims=(2, 3), ndim=3), "need|truncated|payload"),
    (b"DLLM\x01\x02\x01\x04" + b"\x00" * 8, "too short for a 4-dim shape"),
    (header(payload=bytes(11)), "needs 12 payload bytes, frame carries 11"),
    (header(payload=bytes(13)), "needs 12 payload bytes, frame carries 13"),
    (header(dims=(2**32 - 1, 2**32 - 1)), "over the"),
    (header(code=0, dims=(), meta=b"{}", payload=b"xx"), "2 trailing bytes"),
    (header(meta=b"{not json}"), "not valid UTF-8 JSON"),
    (header(meta=b'{"a": NaN}'), "not valid UTF-8 JSON"),
    (header(meta=b'{"a": Infinity}'), "not valid UTF-8 JSON"),
    (header(meta=b'{"a": "\xff\xfe"}'), "not valid UTF-8 JSON"),
    (header(meta=b"[1, 2]"), "must be a JSON object"),
    (header(meta=b'"str"'), "must be a JSON object"),
    (header(meta=b""), "not valid UTF-8 JSON"),
    (header(meta=b"[" * 200_000 + b"]" * 200_000), "not valid UTF-8 JSON"),
    (header(meta=b'{"a":' + b"9" * 5000 + b"}"), "not valid UTF-8 JSON"),
])
def test_decode_malformed(data, match):
    with pytest.raises(WireError, match=match):
        decode(data)


def test_decode_meta_length_beyond_frame():
    data = bytearray(GOOD)
    struct.pack_into("<I", data, 16, 10_000)
    with pytest.raises(WireError, match="truncated"):
        decode(data)


def test_decode_caps_are_configurable():
    with pytest.raises(WireError, match="over the 20-byte cap"):
        decode(GOOD, max_bytes=20)
    with pytest.raises(WireError, match="meta is .* over the 8-byte cap"):
        decode(GOOD, max_meta_bytes=8)
    with pytest.raises(WireError, match="cap"):
        decode(header(dims=(1000, 1000), payload=b""), max_bytes=10**6)


def test_decode_every_truncation():
    for cut in range(len(GOOD)):
        with pytest.raises(WireError):
            decode(GOOD[:cut])


@pytest.mark.parametrize("data", [None, 42, "DLLM", [1, 2], memoryview(bytes(40)).cast("B", (5, 8))[::2]])
def test_decode_non_bytes(data):
    with pytest.raises(WireError, match="bytes-like"):
        decode(data)


# ---------------------------------------------------------------- fuzz
def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    data = bytearray(rng.choice(seeds))
    op = rng.randrange(7)
    if op == 0:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(64)))
    if op == 1:
        return bytes(data[:rng.randrange(len(data) + 1)])
    if op == 2:
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif op == 3:
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.getrandbits(8)
    elif op == 4:  # overwrite a header field with an extreme u32
        off = rng.randrange(0, min(len(data) - 3, 40))
        struct.pack_into("<I", data, off, rng.choice([0, 1, 2**31, 2**32 - 1, rng.getrandbits(32)]))
    elif op == 5:
        i = rng.randrange(len(data) + 1)
        data[i:i] = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 9)))
    else:
        i = rng.randrange(len(data))
        del data[i:i + rng.randrange(1, 9)]
    return bytes(data)


def test_fuzz_decode_only_raises_wire_error():
    rng, gen = random.Random(99), torch.Generator().manual_seed(99)
    seeds = [encode(Frame(rng.choice(list(FrameKind)), random_meta(rng),
                          random_tensor(rng, gen) if i % 3 else None)) for i in range(40)]
    outcomes = {"ok": 0, "error": 0}
    for _ in range(3000):
        data = mutate(rng, seeds)
        try:
            frame = decode(data, max_bytes=1 << 20)
        except WireError:
            outcomes["error"] += 1
            continue
        outcomes["ok"] += 1
        assert isinstance(frame.meta, dict) and isinstance(frame.kind, FrameKind)
        if frame.tensor is not None:
            frame.tensor.float().sum()  # the decoded view is safe to read
    assert outcomes["error"] > 2000 and outcomes["ok"] > 100, outcomes
