"""Launch helpers shared by every op in kernels/ (Liger `ops/utils.py` style).

Importing this module never needs a GPU or triton: when triton is missing, `triton`
and `tl` are stand-ins that let the `@triton.jit` definitions in the op files import
(so their `*_ref` torch references stay usable); calling a launcher then raises.
"""

from __future__ import annotations

import functools
import os

import torch

# Whether this module was imported with triton's interpreter on: @triton.jit picks the interpreter
# at decoration time, so tests that set TRITON_INTERPRET late must reload the kernel modules.
INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"

try:  # triton is an optional dependency (`pip install dllm[gpu]`)
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

    class _TritonStub:
        """Stands in for `triton` / `triton.language` so kernel definitions import."""

        constexpr = object  # only used in annotations: `BLOCK: tl.constexpr`

        @staticmethod
        def jit(fn=None, **_kw):
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, name):
            raise RuntimeError(f"triton is not installed (needed for triton.{name})")

    triton = _TritonStub()
    tl = _TritonStub()

def interpret_mode() -> bool:
    """True when triton runs kernels in its numpy interpreter (CPU tensors allowed)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# triton 3.9's interpreter computes tl.dot on bf16 operands as raw uint16 (garbage), so
# under the interpreter `dot` upcasts to fp32 first. Fixed when this module is imported,
# as triton fixes interpret-vs-compile when @triton.jit runs.
_INTERPRET_UPCAST = tl.constexpr(interpret_mode()) if HAS_TRITON else False


@triton.jit
def dot(a, b):
    """tl.dot with fp32 accumulation; fp32 operands use full IEEE precision (not tf32)."""
    if _INTERPRET_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="ieee")


# Liger's limit: one program holds a whole row of at most this many elements.
MAX_FUSED_SIZE = 65536


def triton_available() -> bool:
    """True when the runtime should use the Triton ops: triton imports and a CUDA GPU is
    present. (Under TRITON_INTERPRET=1 the ops also run on CPU tensors, but only tests
    want that: the numpy interpreter is ~1000x slower than the *_ref functions.)"""
    return HAS_TRITON and torch.cuda.is_available()


def require_triton(*tensors: torch.Tensor) -> None:
    """Raise a clear error before a launch that cannot work here."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use the *_ref functions or `pip install triton`")
    if interpret_mode():
        return
    for t in tensors:
        if t is not None and not t.is_cuda:
            raise RuntimeError(
                f"Triton kernels need CUDA tensors (got a {t.device} tensor); "
                "set TRITON_INTERPRET=1 to run them on CPU"
            )


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def calculate_settings(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel that holds a row of n elements in one program."""
    block = next_power_of_2(n)
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"row of {n} elements exceeds the fused-row limit of {MAX_FUSED_SIZE}")
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int = 0) -> int:
    """Streaming multiprocessors on the GPU (split heuristics aim for ~2 waves).
    Under the interpreter a small fixed number, so heuristics stay deterministic."""
    if interpret_mode() or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(t: torch.Tensor) -> int:
    return num_sms(t.device.index or 0) if t.is_cuda else num_sms()


def check_last_dim_contiguous(t: torch.Tensor, name: str) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride {t.stride(-1)})")


def plan_kv_splits(n_programs: int, max_len: int, sms: int, block_n: int,
                   min_partition: int = 256, max_splits: int = 64) -> tuple[int, int]:
    """Flash-decoding split of a KV length over programs: (num_splits, partition_size).

    Decode at batch 1 has only num_kv_heads (8 for Qwen2.5-32B) programs for 132 SMs,
    so the context is cut into partitions of >= min_partition tokens until there are
    ~2 programs per SM; partition_size is a multiple of block_n."""
    max_len = max(int(max_len), 1)
    splits = 1
    if max_len > min_partition:
        want = cdiv(2 * sms, max(n_programs, 1))
        splits = max(1, min(want, cdiv(max_len, min_partition), max_splits))
    return fix_partition(max_len, splits, block_n)


def fix_partition(max_len: int, splits: int, block_n: int) -> tuple[int, int]:
    """Round a requested split count to equal partitions that are multiples of block_n."""
    splits = max(1, int(splits))
    partition = cdiv(cdiv(max(int(max_len), 1), splits), block_n) * block_n
    return cdiv(max(int(max_len), 1), partition), partition
