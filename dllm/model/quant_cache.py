"""A disk cache of quantized matmul weights, so a dense checkpoint is quantized once, not at every load.

The activation-weighted int4 search (cpu_quant.quantize_int4 with importance) costs about a
minute per 0.5B parameters on two cores; round to nearest costs seconds. Each slot's stored
parts (dllm/weights/quantized.py's layout: int4 codes/scales/mins or int8 codes/scales) go to
``~/.cache/dllm/quant/<key>/<slot>.safetensors``, where the key hashes the recipe, the
checkpoint's shard hashes (its manifest) and the importance file: new weights, new importance or
a new recipe never read an old entry. A stage writes only its own slots; files are written
to a temporary name and renamed, so stages quantizing side by side never see half a file.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dllm.fetch import cache_dir
from dllm.weights.manifest import Manifest


def entry_dir(model_dir: str | Path, manifest: Manifest | None, recipe: dict) -> Path | None:
    """The cache directory for this checkpoint (its ``manifest``) + recipe, or None for a
    checkpoint without a manifest (nothing to key it by: it is quantized at every load)."""
    from dllm.model.calibrate import importance_digest

    if manifest is None:
        return None
    shards = {f: e["sha256"] for f, e in sorted(manifest.files.items()) if f.endswith(".safetensors")}
    blob = json.dumps({"recipe": recipe, "shards": shards, "importance": importance_digest(model_dir)},
                      sort_keys=True)
    return cache_dir() / "quant" / hashlib.sha256(blob.encode()).hexdigest()[:24]


def load_parts(directory: Path | None, slot: str) -> dict[str, torch.Tensor] | None:
    path = directory / f"{slot}.safetensors" if directory is not None else None
    if path is None or not path.is_file():
        return None
    try:
        return {k: v.clone() for k, v in load_file(str(path)).items()}  # own memory, not the file's map
    except Exception:  # a truncated or foreign file: quantize again and overwrite it
        return None


def save_parts(directory: Path | None, slot: str, parts: dict[str, torch.Tensor]) -> None:
    if directory is None:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{slot}.{os.getpid()}.tmp"
        save_file({k: v.contiguous() for k, v in parts.items()}, str(tmp))
        tmp.replace(directory / f"{slot}.safetensors")
    except OSError:  # a read-only or full cache costs only speed at the next load
        pass
