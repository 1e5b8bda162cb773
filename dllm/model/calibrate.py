"""Activation importance for quantization: the mean squared input of every matmul on a calibration text.

A weight column that meets large activations costs more when it is rounded; int4's weighted
search (cpu_quant.quantize_int4) spends its precision there. The importance of a matmul is one
fp32 value per input column, mean over calibration tokens of x_i^2, measured once on the whole
dense model and stored beside the checkpoint as ``importance.safetensors``, keyed by slot
("layers.3.qkv", "layers.3.o", "layers.3.gate_up", "layers.3.down", "head"): q/k/v share one
input, as do gate/up, so a fused weight has one vector. A stage holding layers 12:24 reads the
keys of its own layers, so stages quantize alike without running the rest of the model.

``dllm fetch`` writes it after converting; ``dllm calibrate DIR`` writes it for any whole dense
model. The text is dllm/data/calibration.txt (this project's own docs: prose, tables and code),
held apart from bench/data/perplexity_sample.txt, which measures the result.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

CALIBRATION_TEXT = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"
# all of dllm/data/calibration.txt (~4.1k tokens with Qwen's tokenizer): measured on Qwen2.5-Coder-0.5B
# int4, perplexity over fp32 on bench/data/perplexity_sample.txt, 1024 tokens: +8.7% calibrated on its
# first 2048 tokens, +7.5% on 4096
CALIBRATION_TOKENS = 4096
IMPORTANCE_FILE = "importance.safetensors"


class _Recorder(nn.Module):
    """Stands in for a dense matmul weight: F.linear as before, and sums x^2 per input column."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight
        self.sq = torch.zeros(weight.shape[1], dtype=torch.float64)
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).double()
        self.sq += (x2 * x2).sum(0)
        self.rows += x2.shape[0]
        return F.linear(x, self.weight)


@torch.inference_mode()
def measure_importance(stage, ids: list[int]) -> dict[str, torch.Tensor]:
    """{slot key: fp32 [in]} for a whole dense StageModel on token ids (one prefill). The model's
    matmul weights are put back as plain dense tensors afterwards (a tied head as its own copy)."""
    from dllm.eval import perplexity
    from dllm.model.stage import DENSE_LAYOUTS

    slots = list(zip(stage.slot_keys(), stage.matmul_slots()))
    recorders = {}
    for key, (kind, module, attr) in slots:
        w = getattr(module, attr)
        if kind == "head" and w is None:
            w = stage.embed_tokens.weight
        if isinstance(w, DENSE_LAYOUTS):
            w = w.dense()
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"{key}: importance is measured on a dense model, this one holds {type(w).__name__}")
        recorders[key] = rec = _Recorder(w.data)
        if hasattr(module, attr):
            delattr(module, attr)
        setattr(module, attr, rec)
    try:
        perplexity(stage, ids)
    finally:
        for key, (kind, module, attr) in slots:
            delattr(module, attr)
            setattr(module, attr, nn.Parameter(recorders[key].weight, requires_grad=False))
    return {key: (r.sq / max(r.rows, 1)).float() for key, r in recorders.items()}


def calibration_ids(tokenizer) -> list[int]:
    return tokenizer.encode(CALIBRATION_TEXT.read_text())[:CALIBRATION_TOKENS]


def write_importance(model_dir: str | Path, ids: list[int] | None = None) -> Path:
    """Measure the importance of a whole dense model dir and store it as importance.safetensors
    (on ``ids``, default: the calibration text through the model's tokenizer)."""
    from dllm.model.stage import StageModel
    from dllm.tokenizer import Tokenizer

    model_dir = Path(model_dir)
    stage = StageModel.from_pretrained(model_dir, dtype=torch.float32)
    if stage.quant is not None:
        raise ValueError(f"{model_dir} is a {stage.quant} checkpoint: importance is measured on dense weights")
    imp = measure_importance(stage, ids if ids is not None else calibration_ids(Tokenizer.from_dir(model_dir)))
    out = model_dir / IMPORTANCE_FILE
    tmp = out.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in imp.items()}, str(tmp),
              metadata={"text": CALIBRATION_TEXT.name, "tokens": str(CALIBRATION_TOKENS)})
    tmp.replace(out)
    return out


def load_importance(model_dir: str | Path) -> dict[str, torch.Tensor] | None:
    """The stored importance of a model dir, or None when it has none (int4 then rounds to nearest)."""
    path = Path(model_dir) / IMPORTANCE_FILE
    return load_file(str(path)) if path.is_file() else None


def importance_digest(path: str | Path) -> str:
    """sha256 of a model dir's importance file, or of the importance file ``path`` ('' when
    absent): part of a quantized cache entry's key, and recorded by a calibrated convert."""
    path = Path(path)
    path = path / IMPORTANCE_FILE if path.is_dir() else path
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
