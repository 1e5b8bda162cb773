"""The binary frame that crosses every hop (inside a SecureChannel, see net/crypto.py).

Layout, all integers little-endian::

    offset        size        field
    0             4           magic b"DLLM"
    4             1           version u8 (= 1)
    5             1           kind u8 (FrameKind)
    6             1           dtype code u8 (0 = no tensor, see DTYPE_CODES)
    7             1           ndim u8 (<= MAX_NDIM; 0 with a dtype = a scalar)
    8             4 * ndim    shape dims, u32 each
    8 + 4*ndim    4           meta length u32 (bytes of UTF-8 JSON, incl. padding)
    12 + 4*ndim   meta len    meta: compact JSON object, padded with spaces so the tensor
                              starts at a multiple of 16 (JSON ignores trailing whitespace)
    ...           the rest    tensor bytes: C-contiguous, little-endian, exactly
                              prod(shape) * itemsize bytes

Tensors by kind, with suggested meta (T = tokens or tree nodes in this step, H = hidden size,
n = draft nodes):

    HELLO          none             first frame inside a fresh channel: {"model", "layers", "proto"}
    FORWARD        hidden [T, H]    fp16/bf16/fp32 from pack_hidden; meta: session id, step seq no,
                                    positions, tree parents/depths, keep-list of the last round
    RESULT         hidden [T, H]    last stage -> coordinator (or only the rows the head needs)
    CLOSE_SESSION  none             {"session": id}: free the session's KV on every stage
    ERROR          none             {"code": str, "message": str}
    BUSY           none             {"retry_after_ms": int}: stage has no KV room now
    PING / PONG    none             {"t": sender clock}: liveness and RTT
    DRAFT_REQUEST  ids [T] int64    context tokens for a remote drafter
    DRAFT_REPLY    ids [n] int64    proposed tree tokens; meta carries parents

Hidden states go through ``pack_hidden``: fp16 when every |x| <= 65504 (fp16's largest finite
value), else bf16 when |x| <= 3.39e38, else fp32. The choice is made from the input's range before
the cast, so an overflow is never sent as inf; the chosen dtype is the frame's dtype code.
An *input* holding nan or inf is refused (NonFiniteError): the stage that diverged names itself
instead of the next stage computing garbage. Values beyond fp32's range (possible only from fp64
input) raise HiddenOverflowError. The receiver calls ``unpack_hidden`` to cast to its compute dtype.

``decode`` is zero-copy: the tensor is ``torch.frombuffer`` over the input buffer and keeps it
alive. Pass a writable buffer (SecureChannel.open returns a bytearray) to get a writable tensor;
over read-only ``bytes`` the tensor aliases immutable memory, so do not modify it in place.
Every malformed input raises WireError; nothing is allocated from a declared size before it is
checked against the real payload length.
"""
from __future__ import annotations

import enum
import json
import math
import struct
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from dllm.errors import DllmError

MAGIC = b"DLLM"
VERSION = 1
MAX_NDIM = 8
PAYLOAD_ALIGN = 16
DEFAULT_MAX_FRAME_BYTES = 256 << 20   # [8192, 8192] fp16 is 128 MiB; anything past 2x that is absurd
DEFAULT_MAX_META_BYTES = 1 << 20
_FIXED = struct.Struct("<4sBBBB")
_U32 = struct.Struct("<I")
_DIMS = [struct.Struct(f"<{n}I") for n in range(MAX_NDIM + 1)]


class WireError(DllmError):
    """A frame could not be encoded or decoded; the message says which field is wrong."""


class NonFiniteError(WireError):
    """A hidden state to send already holds nan or inf."""


class HiddenOverflowError(WireError):
    """A hidden state holds finite values beyond fp32's range (only possible from fp64)."""


class FrameKind(enum.IntEnum):
    HELLO = 1
    FORWARD = 2
    RESULT = 3
    CLOSE_SESSION = 4
    ERROR = 5
    BUSY = 6
    PING = 7
    PONG = 8
    DRAFT_REQUEST = 9
    DRAFT_REPLY = 10


DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4,
    torch.int8: 5, torch.uint8: 6, torch.int16: 7, torch.int32: 8, torch.int64: 9,
}
_CODE_DTYPES = {c: d for d, c in DTYPE_CODES.items()}
_KINDS = FrameKind._value2member_map_  # int -> FrameKind without the ~1 us Enum call


@dataclass
class Frame:
    kind: FrameKind
    meta: dict = field(default_factory=dict)
    tensor: torch.Tensor | None = None


# ---------------------------------------------------------------- encode
def encode(frame: Frame, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """Frame -> bytes (one copy of the tensor, into the result)."""
    kind = _check_kind(frame.kind)
    code, shape, payload = _tensor_parts(frame.tensor)
    meta = _encode_meta(frame.meta)
    head = _FIXED.pack(MAGIC, VERSION, kind, code, len(shape)) + _DIMS[len(shape)].pack(*shape)
    if code:
        meta += b" " * (-(len(head) + 4 + len(meta)) % PAYLOAD_ALIGN)
    total = len(head) + 4 + len(meta) + payload.nbytes
    if total > max_bytes:
        raise WireError(f"frame would be {total} bytes, over the {max_bytes}-byte cap (shape {list(shape)})")
    return b"".join((head, _U32.pack(len(meta)), meta, payload))


def _check_kind(kind) -> int:
    if isinstance(kind, bool) or kind not in _KINDS:
        raise WireError(f"unknown frame kind {kind!r}")
    return int(kind)


def _tensor_parts(t: torch.Tensor | None) -> tuple[int, tuple[int, ...], memoryview]:
    if t is None:
        return 0, (), memoryview(b"")
    if not isinstance(t, torch.Tensor):
        raise WireError(f"frame tensor must be a torch.Tensor or None, got {type(t).__name__}")
    fast = _numpy_parts(t)
    if fast is not None:
        return fast
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        raise WireError(f"dtype {t.dtype} cannot cross the wire (supported: {sorted(map(str, DTYPE_CODES))})")
    if t.dim() > MAX_NDIM or max(t.shape, default=0) >= 2**32:
        raise WireError(f"shape {list(t.shape)} exceeds the wire limits (ndim <= {MAX_NDIM}, dims < 2^32)")
    if t.requires_grad or t.device.type != "cpu" or not t.is_contiguous():  # skip ~1 us per call when not needed
        t = t.detach().cpu().contiguous()
    flat = t.view(-1).view(torch.uint8)
    if sys.byteorder == "big" and t.element_size() > 1:  # pragma: no cover - wire is little-endian
        flat = flat.view(-1, t.element_size()).flip(1).reshape(-1)
    return code, tuple(t.shape), memoryview(flat.numpy())


_NUMPY_CODES = {np.dtype(d): c for d, c in ((np.float16, 1), (np.float32, 3), (np.float64, 4), (np.int8, 5),
                                             (np.uint8, 6), (np.int16, 7), (np.int32, 8), (np.int64, 9))}


def _numpy_parts(t: torch.Tensor):
    """The common case (a C-contiguous CPU tensor without grad, of a numpy dtype) through one
    ``numpy()`` call; None for everything else (bf16, scalars, grad, GPU, strided, big-endian).
    It matters for a frame sent right after a forward pass, when caches hold weights only:
    ~60 us there, against ~170 us for the general path's ten tensor attribute calls."""
    if sys.byteorder != "little":  # pragma: no cover
        return None
    try:
        a = t.numpy()
    except (TypeError, RuntimeError):
        return None
    code = _NUMPY_CODES.get(a.dtype)
    if code is None or not a.ndim or not a.size or a.ndim > MAX_NDIM or not a.flags.c_contiguous \
            or max(a.shape) >= 2**32:
        return None
    return code, a.shape, memoryview(a).cast("B")


_JSON_OUT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)  # compact, built once


def _encode_meta(meta) -> bytes:
    if not isinstance(meta, dict):
        raise WireError(f"frame meta must be a dict, got {type(meta).__name__}")
    try:
        return _JSON_OUT.encode(meta).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise WireError(f"frame meta is not plain JSON (no nan/inf, str keys, lists/dicts/numbers/str): {e}") from None


# ---------------------------------------------------------------- decode
def decode(data, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
           max_meta_bytes: int = DEFAULT_MAX_META_BYTES) -> Frame:
    """bytes-like -> Frame; the tensor views ``data`` without copying. Raises only WireError."""
    mv = _byte_view(data)
    n = len(mv)
    if n > max_bytes:
        raise WireError(f"frame is {n} bytes, over the {max_bytes}-byte cap")
    if n < _FIXED.size + 4:
        raise WireError(f"frame is {n} bytes, shorter than the {_FIXED.size + 4}-byte minimum header (truncated)")
    magic, version, kind, code, ndim = _FIXED.unpack_from(mv, 0)
    _check_header(magic, version, kind, code, ndim)
    meta_off = _FIXED.size + 4 * ndim + 4
    if n < meta_off:
        raise WireError(f"frame is {n} bytes, too short for a {ndim}-dim shape header (truncated)")
    shape = _DIMS[ndim].unpack_from(mv, _FIXED.size)
    meta_len = _U32.unpack_from(mv, meta_off - 4)[0]
    if meta_len > max_meta_bytes:
        raise WireError(f"meta is {meta_len} bytes, over the {max_meta_bytes}-byte cap")
    if meta_off + meta_len > n:
        raise WireError(f"meta claims {meta_len} bytes but only {n - meta_off} follow the header (truncated)")
    meta = _decode_meta(mv[meta_off:meta_off + meta_len])
    tensor = _decode_tensor(mv, meta_off + meta_len, code, shape, max_bytes)
    return Frame(_KINDS[kind], meta, tensor)


def _byte_view(data) -> memoryview:
    try:
        return memoryview(data).cast("B")
    except TypeError:
        raise WireError(f"frame must be a contiguous bytes-like object, got {type(data).__name__}") from None


def _check_header(magic: bytes, version: int, kind: int, code: int, ndim: int) -> None:
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}, expected {MAGIC!r}: not a dllm frame")
    if version != VERSION:
        raise WireError(f"frame is wire version {version}, this build speaks version {VERSION}")
    if kind not in FrameKind._value2member_map_:
        raise WireError(f"unknown frame kind {kind}")
    if code and code not in _CODE_DTYPES:
        raise WireError(f"unknown dtype code {code}")
    if ndim > MAX_NDIM or (ndim and not code):
        raise WireError(f"bad ndim {ndim} for dtype code {code} (max {MAX_NDIM}; no shape without a tensor)")


def _decode_meta(raw: memoryview) -> dict:
    try:
        meta = _JSON.decode(str(raw, "utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WireError(f"meta is not valid UTF-8 JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(meta, dict):
        raise WireError(f"meta must be a JSON object, got {type(meta).__name__}")
    return meta


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in meta")


_JSON = json.JSONDecoder(parse_constant=_reject_constant)  # built once: json.loads(**kw) builds one per call


def _decode_tensor(mv: memoryview, off: int, code: int, shape: tuple[int, ...], max_bytes: int):
    left = len(mv) - off
    if not code:
        if left:
            raise WireError(f"frame has no tensor but {left} trailing bytes")
        return None
    dtype = _CODE_DTYPES[code]
    numel = math.prod(shape)
    need = numel * dtype.itemsize
    if need > max_bytes:
        raise WireError(f"shape {list(shape)} {dtype} needs {need} bytes, over the {max_bytes}-byte cap")
    if need != left:
        raise WireError(f"shape {list(shape)} {dtype} needs {need} payload bytes, frame carries {left}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    t = torch.frombuffer(mv, dtype=dtype, count=numel, offset=off)
    if t.data_ptr() % dtype.itemsize:  # another encoder skipped the padding: copy rather than misalign
        t = t.clone()
    if sys.byteorder == "big" and dtype.itemsize > 1:  # pragma: no cover
        t = t.view(torch.uint8).view(-1, dtype.itemsize).flip(1).contiguous().view(dtype)
    return t.view(shape)


# ---------------------------------------------------------------- hidden states
# Largest finite value of each wire dtype: a value at or below it casts (round-to-nearest) to a
# finite value, so the choice is made from the input's range before casting. One aminmax pass
# costs ~5 us on a [1, 5120] row, where torch.isfinite(y).all() after a trial cast cost ~35 us.
_WIRE_FLOATS = [(d, torch.finfo(d).max) for d in (torch.float16, torch.bfloat16, torch.float32)]


def pack_hidden(x: torch.Tensor) -> torch.Tensor:
    """Hidden [T, H] -> the narrowest of fp16 / bf16 / fp32 that holds every value finite."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise WireError(f"hidden state must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.numel() == 0:
        return x.to(torch.float16)
    lo, hi = x.aminmax()  # both nan if any value is nan
    peak = max(-lo.item(), hi.item())
    if not math.isfinite(peak):
        _refuse_non_finite(x)
    for dtype, limit in _WIRE_FLOATS:
        if peak <= limit:
            return x.to(dtype)
    raise HiddenOverflowError(f"hidden state {list(x.shape)} has |x| up to {peak:.3g}, beyond fp32's "
                              f"{_WIRE_FLOATS[-1][1]:.3g}: cannot send it without inf")


def _refuse_non_finite(x: torch.Tensor) -> None:
    first = [int(i) for i in (~torch.isfinite(x)).nonzero()[0]]
    raise NonFiniteError(f"hidden state {list(x.shape)} holds {int(x.isnan().sum())} nan and "
                         f"{int(x.isinf().sum())} inf values (first at index {first}): refusing to send; "
                         f"this stage's computation diverged")


def unpack_hidden(t: torch.Tensor, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """Cast a received hidden state to this stage's compute dtype (and device)."""
    return t.to(device=device, dtype=dtype)
