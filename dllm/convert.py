"""GGUF file or HF directory -> a dllm model dir split into per-stage safetensors shards.

Output (see dllm/weights/manifest.py for manifest.json)::

    OUT/config.json                        ModelConfig.to_hf()
    OUT/tokenizer.json, tokenizer_config.json
    OUT/stage-00-of-02.safetensors         layers [0, a) + embed_tokens, norm, lm_head (coordinator)
    OUT/stage-01-of-02.safetensors         layers [a, L)
    OUT/model.safetensors.index.json       {"metadata": {...}, "weight_map": {name: file}}
    OUT/manifest.json                      sha256 + bytes of every file above, and the split

Shards are written by hand in the safetensors format so that only one tensor is in memory at a time
(safetensors.save_file needs the whole shard as a dict; a 70B stage in fp32 would not fit).
Everything goes to a hidden sibling directory first and is renamed into place at the end, so a
crash leaves no directory at OUT that looks like a finished model.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from dllm.errors import ConfigError
from dllm.weights.manifest import Manifest, StageEntry, file_entry, sha256_file_cached

DTYPES = {"float32": (torch.float32, "F32"), "float16": (torch.float16, "F16"), "bfloat16": (torch.bfloat16, "BF16")}
INDEX_NAME = "model.safetensors.index.json"
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")


class SplitError(ConfigError):
    """A --stages / --split request that does not cover the model's layers exactly."""


# ---- split planning (pure Python) --------------------------------------------------------------

def parse_split(text: str) -> list[tuple[int, int]]:
    """'0:12,12:24' -> [(0, 12), (12, 24)]."""
    ranges = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", part)
        if m is None:
            raise SplitError(f"bad split range {part!r} in {text!r}: expected START:END, e.g. 0:12,12:24")
        ranges.append((int(m.group(1)), int(m.group(2))))
    return ranges


def even_split(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """stages contiguous ranges; the extra layers go to the last stages (stage 0 also holds embed/head)."""
    if stages < 1 or stages > num_layers:
        raise SplitError(f"--stages {stages} is out of range: the model has {num_layers} layers (1..{num_layers})")
    base, extra = divmod(num_layers, stages)
    sizes = [base + (i >= stages - extra) for i in range(stages)]
    starts = [sum(sizes[:i]) for i in range(stages)]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def check_split(ranges: list[tuple[int, int]], num_layers: int) -> list[tuple[int, int]]:
    """Raise SplitError unless ranges are non-empty, contiguous and cover exactly 0..num_layers."""
    if not ranges:
        raise SplitError("empty split: give at least one START:END range")
    expect = 0
    for a, b in ranges:
        if a != expect:
            what = "gap" if a > expect else "overlap"
            raise SplitError(f"split {_fmt(ranges)} has a {what} at layer {expect}: range {a}:{b} should start at {expect}")
        if b <= a:
            raise SplitError(f"split {_fmt(ranges)}: range {a}:{b} is empty")
        expect = b
    if expect != num_layers:
        raise SplitError(f"split {_fmt(ranges)} ends at layer {expect} but the model has {num_layers} layers")
    return [tuple(r) for r in ranges]


def plan_stages(num_layers: int, stages: int = 1, split=None) -> list[tuple[int, int]]:
    """The layer range of each stage, from either a stage count or an explicit split."""
    if split is None:
        return even_split(num_layers, stages)
    return check_split(parse_split(split) if isinstance(split, str) else list(split), num_layers)


def stage_of(name: str, ranges: list[tuple[int, int]]) -> int:
    """Stage index that owns an HF tensor name; non-layer tensors (embed, norm, head) go to stage 0."""
    m = _LAYER_RE.match(name)
    if m is None:
        return 0
    layer = int(m.group(1))
    return next(i for i, (a, b) in enumerate(ranges) if a <= layer < b)


def _fmt(ranges) -> str:
    return ",".join(f"{a}:{b}" for a, b in ranges)


# ---- sources -------------------------------------------------------------------------------------

def open_source(src: str | Path):
    """GGUFSource for a .gguf file, HFDirSource for a directory with config.json."""
    p = Path(src)
    if p.is_dir():
        from dllm.weights.safetensors_source import HFDirSource
        return HFDirSource(p)
    from dllm.weights.gguf_import import GGUFSource
    return GGUFSource(p)  # raises WeightsError naming the file when it is missing or not a GGUF


def tokenizer_files(source) -> dict[str, str | bytes]:
    """Tokenizer files for OUT: copied from an HF dir, rebuilt from GGUF metadata otherwise."""
    if source.kind == "hf":
        return source.tokenizer_files()
    try:
        from dllm.weights.gguf_tokenizer import build_tokenizer_files
    except ImportError as e:  # weights stay usable by stages; only the coordinator needs a tokenizer
        print(f"warning: no tokenizer files written ({e})", file=sys.stderr)
        return {}
    return build_tokenizer_files(source.reader)


def source_info(source) -> dict:
    """manifest.source: what this model was converted from, with a digest to tell versions apart."""
    if source.kind == "gguf":
        return {"kind": "gguf", "name": source.path.name, "sha256": sha256_file_cached(source.path)}
    h = hashlib.sha256()  # digest of the weight files' digests: one value for a sharded checkpoint
    for f in source.weight_files():
        h.update(f"{f.name}:{sha256_file_cached(f)}\n".encode())
    return {"kind": "hf", "name": source.path.name, "sha256": h.hexdigest()}


# ---- writing -----------------------------------------------------------------------------------

def write_shard(path: Path, source, names: list[str], dtype: str, bar=None) -> int:
    """Write names to a safetensors file, one tensor in memory at a time; returns payload bytes.

    The header (name -> dtype, shape, byte range) is computed from source.shape() before any data
    is read, then each tensor is loaded, cast and appended.
    """
    torch_dtype, st_dtype = DTYPES[dtype]
    item = torch.empty((), dtype=torch_dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        shape = list(source.shape(name))
        nbytes = item * _numel(shape)
        header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the payload 8-byte aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in names:
            t = source.load(name).to(torch_dtype).contiguous()
            if list(t.shape) != header[name]["shape"]:
                raise ConfigError(f"{name}: loaded shape {list(t.shape)} != declared {header[name]['shape']}")
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            if bar is not None:
                bar.update(1)
    return offset


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _write_text(path: Path, data: str | bytes) -> None:
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def convert(src, out, stages: int = 1, split=None, dtype: str = "float32", progress: bool = True,
            overwrite: bool = False) -> Manifest:
    """Convert SRC (GGUF file or HF dir) into OUT; returns the saved Manifest.

    dtype defaults to float32: GGUF weights dequantize to exact fp32 values, and rounding them to
    fp16 moves logits by more than the 1e-3 we hold against the HF oracle.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"unsupported --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output {out} already exists and is not empty (remove it or pass overwrite)")
    source = open_source(src)
    cfg = source.config
    ranges = plan_stages(cfg.num_layers, stages, split)
    source.check_supported()  # fail on an unsupported quant type before writing anything
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        manifest = _convert_into(tmp, source, cfg, ranges, dtype, progress)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _convert_into(tmp: Path, source, cfg, ranges, dtype: str, progress: bool) -> Manifest:
    names = source.tensor_names()
    n = len(ranges)
    files = [f"stage-{i:02d}-of-{n:02d}.safetensors" for i in range(n)]
    by_stage = [[] for _ in ranges]
    for name in names:
        by_stage[stage_of(name, ranges)].append(name)
    extra = {"config.json": json.dumps(cfg.to_hf(), indent=2) + "\n", **tokenizer_files(source)}
    for fname, data in extra.items():
        _write_text(tmp / fname, data)
    total = 0
    with tqdm(total=len(names), desc=f"convert {Path(source.path).name}", unit="tensor",
              disable=not progress, file=sys.stderr) as bar:
        for fname, stage_names in zip(files, by_stage):
            total += write_shard(tmp / fname, source, stage_names, dtype, bar)
    index = {"metadata": {"total_size": total, "format": "dllm", "dtype": dtype},
             "weight_map": {name: files[i] for i, ns in enumerate(by_stage) for name in ns}}
    _write_text(tmp / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    written = [*extra, *files, INDEX_NAME]
    manifest = Manifest(
        files={f: file_entry(tmp / f) for f in written},
        stages=[StageEntry(f, r, embed=(i == 0), head=(i == 0)) for i, (f, r) in enumerate(zip(files, ranges))],
        dtype=dtype, num_layers=cfg.num_layers, source=source_info(source))
    manifest.save(tmp)
    return manifest


def _remove_dead_partials(out: Path) -> None:
    """Delete .OUT.partial-PID dirs left by killed converts (PID gone); a live one is left alone."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished tmp dir to out; an existing out is swapped aside and removed after."""
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
