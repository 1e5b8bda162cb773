"""Int4 weights for the runtime: a W4Packed holder that acts as a matmul weight.

`Int4Weight` replaces a dense [out, in] weight in Attention/MLP (see StageModel.quantize).
Its buffers are the layout dllm/kernels/w4a16_matmul.py reads (qweight [in/8, out] int32, scales
[in/g, out], zeros [in/g, out] uint8, and the kernel's split-K counters): 0.52 bytes a weight instead of 2, which is what a
memory-bound decode step streams. On CUDA the Triton W4A16 kernel runs; elsewhere (or with
kernels off) the torch reference dequantizes and multiplies, so CPU results equal a dense
model whose weights were replaced by their dequantized values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dllm import kernels

# Rows quantized per pass: the reference quantizer holds ~30 bytes of temporaries per weight,
# so 8192 rows of a 5120-wide weight stay near 1.3 GB; the whole 55296-row gate_up of
# Qwen2.5-32B at once would need ~9 GB next to 65 GB of bf16 weights on an 80 GB card.
ROWS_PER_PASS = 8192


class Int4Weight(nn.Module):
    def __init__(self, packed: kernels.W4Packed, use_kernels: bool = False):
        super().__init__()
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("zeros", packed.zeros)
        # split-K done-counters of the kernel (zeros; not part of the checkpoint)
        self.register_buffer("locks", kernels.new_locks(packed.shape[0], packed.qweight.device), persistent=False)
        self.shape = packed.shape
        self.group = packed.group
        self.use_kernels = use_kernels

    @classmethod
    def from_dense(cls, w: torch.Tensor, group: int = 128, use_kernels: bool = False) -> "Int4Weight":
        return cls(quantize_rows(w, group), use_kernels)

    @property
    def packed(self) -> kernels.W4Packed:
        return kernels.W4Packed(self.qweight, self.scales, self.zeros, self.shape, self.group, self.locks)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense [out, in] (what the reference path multiplies by)."""
        return kernels.dequantize_w4_ref(self.packed, dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x.dtype."""
        x2 = x.reshape(-1, self.shape[1]).contiguous()
        fn = kernels.w4a16_matmul if self.use_kernels else kernels.w4a16_matmul_ref
        return fn(x2, self.packed).view(*x.shape[:-1], self.shape[0])

    def extra_repr(self) -> str:
        return f"out={self.shape[0]}, in={self.shape[1]}, group={self.group}"


def quantize_rows(w: torch.Tensor, group: int = 128, rows: int = ROWS_PER_PASS) -> kernels.W4Packed:
    """quantize_w4 over blocks of output rows (same result, bounded temporaries)."""
    parts = [kernels.quantize_w4(w[i:i + rows], group) for i in range(0, w.shape[0], rows)]
    if len(parts) == 1:
        return parts[0]
    return kernels.W4Packed(torch.cat([p.qweight for p in parts], 1), torch.cat([p.scales for p in parts], 1),
                            torch.cat([p.zeros for p in parts], 1), tuple(w.shape), group)


class PackedWeight(nn.Module):
    """A dense fp32 [out, in] weight packed once into oneDNN's blocked layout (CPU), applied by
    oneDNN's inner product instead of torch's matmul (MKL).

    On this project's 2-core EPYC, MKL's sgemm at a few rows is far from the memory bound (8 rows
    cost ~3x one row), so a batched decode step cost nearly what the separate steps did. The 30
    layers + head of SmolLM2 (one thread, weights cycled through more than the L3), ms at
    1 / 4 / 8 rows: MKL (tall weights input-major, as before this class) 41 / 110 / 132, packed
    oneDNN 50 / 37 / 52. oneDNN's 1..3-row path is the slow one, and for inputs of 1536+ columns
    it also rounds differently from the rest; so fewer than ``MIN_ROWS`` rows are padded to it,
    and every row goes through the same kernel whatever the batch, so its result is the same bits
    alone or batched (checked at 1..256 rows; tests/test_engine_batching.py).

    The padding is paid in arithmetic: end to end, one SmolLM2 sequence decodes ~15% slower than
    with MKL input-major weights at one thread (17 vs 20 tok/s, same minutes, 2026-12-02), where
    the 4 padded rows are compute one thread cannot hide, and faster at two (22-26 vs 21).
    """

    MIN_ROWS = 4

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(w.detach().float().contiguous(), None))
        self.shape = (w.shape[0], w.shape[1])

    @staticmethod
    def available() -> bool:
        return torch.backends.mkldnn.is_available()

    def dense(self) -> torch.Tensor:
        """The [out, in] fp32 weight."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, in] fp32 -> [N, out]."""
        n = x.shape[0]
        if n < self.MIN_ROWS:
            return self.forward(F.pad(x, (0, 0, 0, self.MIN_ROWS - n)))[:n]  # zero rows below x
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


class GemvWeight(nn.Module):
    """A dense fp32 [out, in] weight laid out for one sequence at a time on CPU, so that one row
    is MKL's sgemv, which streams the weights at the machine's full read bandwidth, where
    oneDNN's packed path (PackedWeight) pads the row to four and runs a small GEMM. SmolLM2's 121
    matmuls at one row, two threads (2026-12-08; a reduction reads 28.6 GB/s, a big sgemv 34):
    MKL input-major 16.7 ms (32 GB/s), MKL [out, in] 18.7, oneDNN packed 28.8 (24.5 unpadded).

    Orientation by shape: input-major ([in, out], ``x @ w``) unless the input is at least four
    times the output, where [out, in] (``F.linear``: one long dot product per output) streams
    better. Whole-model sgemv passes, ms, rule / all input-major / all [out, in] (2026-12-08):
    Qwen2.5-1.5B 187 / 196 / 195 (its down, 1536 x 8960, is the one [out, in] matrix), SmolLM2
    with its down (576 x 1536) [out, in] 18.1 / 17.4 / 19.5, hence the factor four.

    A row's result here is not the same bits alone and inside a bigger batch (MKL switches
    kernels at four rows), so this layout serves an engine that runs one sequence and verifies no
    drafts (``dllm run --prompt`` without --draft; launch.local_engine enforces it): batching and
    speculation, whose exactness rests on a row computing the same bits alone or batched, keep
    PackedWeight. Several rows (a prefill) go through MKL's sgemm on the same matrix."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.shape = (w.shape[0], w.shape[1])
        self.input_major = 4 * w.shape[0] > w.shape[1]
        w = w.detach().float()
        self.register_buffer("w", (w.t() if self.input_major else w).contiguous())

    def dense(self) -> torch.Tensor:
        """The [out, in] fp32 weight."""
        return self.w.t().contiguous() if self.input_major else self.w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, in] fp32 -> [N, out]."""
        return x @ self.w if self.input_major else F.linear(x, self.w)

    def extra_repr(self) -> str:
        return f"out={self.shape[0]}, in={self.shape[1]}, input_major={self.input_major}"


CPU_LAYOUTS = {"batched": PackedWeight, "single": GemvWeight}


def linear(x: torch.Tensor, w: torch.Tensor | nn.Module, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a dense weight, or any weight module (packed fp32, int4, int8) applied to x.
    Weight modules are applied through .forward: nn.Module.__call__'s hook handling costs ~2 us,
    paid 4 times a layer per step."""
    if isinstance(w, nn.Module):
        y = w.forward(x)
        return y if bias is None else y + bias
    return F.linear(x, w, bias)
