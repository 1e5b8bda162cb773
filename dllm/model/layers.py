"""The layers of a llama-family decoder block, in plain PyTorch.

Projections are fused at load time: q/k/v into one [q+2kv, H] weight and gate/up into one
[2I, H] weight, so a decode step does 4 matmuls per layer instead of 7 (on CPU each op costs
~10 µs of dispatch; at batch 1 that overhead is most of a small model's step).
Activations are flat over tokens: [T, H].

Each module has two paths with the same arithmetic: plain torch (CPU, `DLLM_KERNELS=0`) and the
Triton ops of dllm/kernels/ (`use_kernels`, set by StageModel.set_kernels). The kernel path fuses
the residual add into the next RMSNorm, the qkv bias add, rope and the K/V cache write into one launch,
and fuses SwiGLU; attention follows the metadata's form (dllm/model/attention.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dllm.config import ModelConfig
from dllm.errors import ConfigError
from dllm import kernels
from dllm.model.attention import AttentionMetadata, paged_attention, store_kv
from dllm.model.quant import linear


class RMSNorm(nn.Module):
    """HF llama semantics: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps
        self.use_kernels = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernels:
            return kernels.rmsnorm(x, self.weight, self.eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): one fused pass on the kernel path."""
        if self.use_kernels:
            return kernels.add_rmsnorm(x, residual, self.weight, self.eps)
        residual = x + residual
        return self.forward(residual), residual


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """inv_freq [head_dim/2] and the attention scaling factor, per the checkpoint's rope_scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rs = config.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(rs["factor"]), 1.0
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor, low, high = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_ctx = float(rs["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled), 1.0
    raise ConfigError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")


class Rotary(nn.Module):
    """RoPE in HF's rotate_half layout, with a cos/sin table grown on demand."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.attn_factor = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self._cos = self._sin = None
        self._kcos = self._ksin = None

    def _table(self, n: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < n or self._cos.dtype != dtype:
            n = max(n, 4096 if self._cos is None else 2 * self._cos.shape[0])
            t = torch.arange(n, dtype=torch.float32, device=device)
            freqs = torch.outer(t, self.inv_freq.to(device))
            emb = torch.cat([freqs, freqs], dim=-1)  # [n, hd]
            self._cos = (emb.cos() * self.attn_factor).to(dtype)
            sin = (emb.sin() * self.attn_factor).to(dtype)
            half = sin.shape[-1] // 2
            self._sin = torch.cat([-sin[:, :half], sin[:, half:]], -1)  # rotate_half's sign folded in
        return self._cos, self._sin

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin [T, 1, hd] for positions [T] (apply_rope's operands)."""
        cos, sin = self._table(int(positions.max()) + 1, dtype, positions.device)
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)

    def kernel_table(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [>= n, hd/2] fp32 for kernels.rope (which indexes them by position on the GPU).
        Grown only when n exceeds it, so a CUDA graph captured after sizing it stays valid."""
        if self._kcos is None or self._kcos.shape[0] < n or self._kcos.device != torch.device(device):
            n = max(n, 4096 if self._kcos is None else 2 * self._kcos.shape[0])
            freqs = torch.outer(torch.arange(n, dtype=torch.float64), self.inv_freq.double().cpu())
            self._kcos = (freqs.cos() * self.attn_factor).float().to(device)
            self._ksin = (freqs.sin() * self.attn_factor).float().to(device)
        return self._kcos, self._ksin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, hd] rotated by cos / signed sin [T, 1, hd] (rotate_half convention).

    HF's x * cos + cat(-x2, x1) * sin, with the minus sign folded into the table's first half so
    the rotation is one roll and two multiplies (three ops, not seven: at batch 1 on CPU each op
    is a few microseconds of dispatch, and this runs twice per layer per step)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_size, self.kv_size = c.q_size, c.kv_size
        self.scale = c.head_dim ** -0.5
        self.qkv_weight = nn.Parameter(torch.empty(c.q_size + 2 * c.kv_size, c.hidden_size), requires_grad=False)
        self.qkv_bias = nn.Parameter(torch.empty(c.q_size + 2 * c.kv_size), requires_grad=False) if c.qkv_bias else None
        self.o_weight = nn.Parameter(torch.empty(c.hidden_size, c.q_size), requires_grad=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.use_kernels = False

    def forward(self, x: torch.Tensor, cos, sin, kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """x [T, H] -> [T, H]. cos/sin: [T, 1, hd] per token (torch path) or the [N, hd/2] fp32
        tables indexed by meta.positions (kernel path)."""
        T = x.shape[0]
        # kernel path without q/k norm: the bias add rides in the fused rope + cache-write launch
        fuse_bias = self.use_kernels and self.q_norm is None
        qkv = linear(x, self.qkv_weight, None if fuse_bias else self.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_kernels:
            # q rotated in place (a view of qkv); rotated k and v go straight to their cache slots
            kernels.rope_store_kv(q, k, v, meta.positions, cos, sin, kv[0], kv[1], meta.slot_mapping,
                                  self.qkv_bias if fuse_bias else None)
        else:
            if self.q_norm is None:
                # q and k are adjacent columns of qkv: rotate them as one [T, heads + kv_heads, hd] block
                qk = apply_rope(qkv[:, :self.q_size + self.kv_size].view(T, -1, self.head_dim), cos, sin)
                q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
            else:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            store_kv(kv[0], kv[1], k, v, meta.slot_mapping)
        o = paged_attention(q, kv[0], kv[1], meta, self.scale)
        return linear(o.reshape(T, self.q_size), self.o_weight)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.inter = config.intermediate_size
        self.gate_up_weight = nn.Parameter(torch.empty(2 * config.intermediate_size, config.hidden_size), requires_grad=False)
        self.down_weight = nn.Parameter(torch.empty(config.hidden_size, config.intermediate_size), requires_grad=False)
        self.use_kernels = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = linear(x, self.gate_up_weight)  # [T, 2I]
        if self.use_kernels:
            return linear(kernels.swiglu(gate_up), self.down_weight)
        gate, up = gate_up.split(self.inter, dim=-1)
        return linear(F.silu(gate) * up, self.down_weight)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, cos, sin, kv, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (mlp output, residual): the caller adds the last pair. Deferring each
        add into the next norm is exactly `h = x + attn(norm(x)); h + mlp(norm(h))`, and on the
        kernel path it is one fused add+norm pass instead of three."""
        # submodules run through .forward, not __call__: no hooks are used, and __call__ costs
        # ~2 us each, 3 times a layer per step (SmolLM2's decode step is ~13 ms on 2 cores)
        if residual is None:
            residual, h = x, self.input_norm.forward(x)
        else:
            h, residual = self.input_norm.add(x, residual)
        h, residual = self.post_attn_norm.add(self.attn.forward(h, cos, sin, kv, meta), residual)
        return self.mlp.forward(h), residual
