"""Read only the tensors a stage owns from a safetensors checkpoint.

Works on an HF directory (model.safetensors, or shards + model.safetensors.index.json) and on
a dllm-converted directory (per-stage shards + index + manifest.json). Only the files that
hold the wanted tensors are opened; with a manifest, exactly those files are sha256-checked.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

try:
    from safetensors import SafetensorError as SafetensorsError
except ImportError:  # older releases
    SafetensorsError = Exception

from dllm.errors import WeightsError
from dllm.weights.manifest import Manifest

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def weight_map(model_dir: str | Path) -> dict[str, str]:
    """tensor name -> file name, from the index (or the single file's own header)."""
    d = Path(model_dir)
    index = d / INDEX_NAME
    if index.is_file():
        try:
            return json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"{index} is malformed: {e}") from None
    single = d / SINGLE_NAME
    if single.is_file():
        with _open(single) as f:
            return {k: SINGLE_NAME for k in f.keys()}
    raise WeightsError(f"no {INDEX_NAME} or {SINGLE_NAME} in {d}")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise WeightsError(f"missing shard {path.name} in {path.parent}") from None
    except (SafetensorsError, OSError) as e:
        raise WeightsError(f"cannot read shard {path.name}: {e}") from None


def load_tensors(model_dir: str | Path, names: list[str], verify: bool = True) -> dict[str, torch.Tensor]:
    """Load exactly ``names``; a name absent from the checkpoint fails with that name."""
    d = Path(model_dir)
    wmap = weight_map(d)
    missing = [n for n in names if n not in wmap]
    if missing:
        raise WeightsError(f"checkpoint {d} lacks tensor(s): {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(wmap[n], []).append(n)
    manifest = Manifest.load(d) if verify else None
    if manifest is not None:
        manifest.verify(d, sorted(by_file))
    out = {}
    for fname, fnames in by_file.items():
        with _open(d / fname) as f:
            keys = set(f.keys())
            for n in fnames:
                if n not in keys:
                    raise WeightsError(f"shard {fname} does not contain {n} although the index says so")
                try:
                    out[n] = f.get_tensor(n)
                except SafetensorsError as e:
                    raise WeightsError(f"shard {fname}: tensor {n} unreadable ({e})") from None
    return out
