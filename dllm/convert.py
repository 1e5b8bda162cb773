"""GGUF file or HF directory -> a dllm model dir split into per-stage safetensors shards.

Output (see dllm/weights/manifest.py for manifest.json)::

    OUT/config.json                        ModelConfig.to_hf()
    OUT/tokenizer.json, tokenizer_config.json
    OUT/stage-00-of-02.safetensors         layers [0, a) + embed_tokens, norm, lm_head (coordinator)
    OUT/stage-01-of-02.safetensors         layers [a, L)
    OUT/model.safetensors.index.json       {"metadata": {...}, "weight_map": {name: file}}
    (with --quant int8|int4 the matmul weights are stored quantized: dllm/weights/quantized.py)
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

class Entry:
    """One tensor of an output shard: its name, shape and dtype (known before any data is read)
    and how to produce it."""
    __slots__ = ("name", "shape", "dtype", "load")

    def __init__(self, name: str, shape: list[int], dtype: torch.dtype, load):
        self.name, self.shape, self.dtype, self.load = name, list(shape), dtype, load


ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
             torch.int32: "I32", torch.uint8: "U8"}


def shard_entries(source, names: list[str], dtype: str, quant: str | None = None, group: int = 32,
                  head_stage: bool = False, importance: dict | None = None) -> list[Entry]:
    """The tensors one stage's shard holds. Dense names are cast to ``dtype``; with ``quant`` the
    matmul weights become their quantized parts (dllm/weights/quantized.py), each quantized once,
    and the head stage of a tied model gets its own lm_head.* parts from the embedding.
    ``importance`` ({slot key: [in]}, dllm/model/calibrate.py) makes int4 the activation-weighted
    search, the same parts the runtime's quantize gives the same weights (rows are quantized
    independently, so q, k and v alone equal their fused q|k|v)."""
    from dllm.weights import quantized

    torch_dtype = DTYPES[dtype][0]
    entries, memo = [], {}

    def part(src: str, out: str, p: str):
        def load():
            if memo.get("name") != src:  # the parts of one weight are written one after another
                imp = importance.get(quantized.slot_key(out)) if importance else None
                memo.update(name=src, parts=quantized.quantize_tensor(source.load(src),
                                                                      quantized.tensor_mode(out, quant), group, imp))
            return memo["parts"][p]
        return load

    todo = list(names)
    if quant is not None and head_stage and "lm_head.weight" not in names and "model.embed_tokens.weight" in names:
        todo.append("model.embed_tokens.weight as lm_head.weight")  # tied head, quantized on its own
    for name in todo:
        src, _, out = name.partition(" as ")
        out = out or src
        if quant is not None and quantized.is_matmul_weight(out):
            mode = quantized.tensor_mode(out, quant)
            for p, (shape, dt) in quantized.stored_shapes(tuple(source.shape(src)), mode, group).items():
                entries.append(Entry(f"{quantized.base_name(out)}.{p}", shape, dt, part(src, out, p)))
        else:
            entries.append(Entry(out, list(source.shape(src)), torch_dtype,
                                 lambda src=src: source.load(src).to(torch_dtype)))
    return entries


def write_shard(path: Path, entries: list[Entry], bar=None) -> int:
    """Write entries to a safetensors file, one tensor in memory at a time; returns payload bytes.

    The header (name -> dtype, shape, byte range) is computed from the entries before any data
    is read, then each tensor is produced and appended.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for e in entries:
        nbytes = torch.empty((), dtype=e.dtype).element_size() * _numel(e.shape)
        header[e.name] = {"dtype": ST_DTYPES[e.dtype], "shape": e.shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the payload 8-byte aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for e in entries:
            t = e.load().contiguous()
            if list(t.shape) != e.shape or t.dtype != e.dtype:
                raise ConfigError(f"{e.name}: produced {t.dtype} {list(t.shape)} != declared {e.dtype} {e.shape}")
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
            overwrite: bool = False, quant: str | None = None, group: int = 32,
            importance: str | Path | None = None, calibrate: bool = False,
            calibration_ids: list[int] | None = None) -> Manifest:
    """Convert SRC (GGUF file or HF dir) into OUT; returns the saved Manifest.

    dtype defaults to float32: GGUF weights dequantize to exact fp32 values, and rounding them to
    fp16 moves logits by more than the 1e-3 we hold against the HF oracle. ``quant`` ("int8" /
    "int4", group-wise with ``group`` columns) stores the matmul weights quantized
    (dllm/weights/quantized.py); dtype then applies to the embedding and norms.

    int4 weighs its rounding by activation importance (dllm/model/calibrate.py) when it has one:
    ``importance`` (an importance.safetensors), else the source dir's own (``dllm calibrate`` or
    ``dllm fetch`` wrote it), else, with ``calibrate``, one measured here: the source is first
    converted dense (fp32) into a scratch dir beside OUT and run on the calibration text. Without
    any, int4 rounds to nearest. The manifest's "quant" records the importance file's sha256.
    ``calibration_ids`` replaces the calibration text's tokens (tests: models with no tokenizer).
    """
    if dtype not in DTYPES:
        raise ConfigError(f"unsupported --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    from dllm.model.cpu_quant import INT4_GROUPS
    from dllm.weights.quantized import MODES

    if quant not in (None, *MODES):
        raise ConfigError(f"unsupported --quant {quant!r}; choose {' or '.join(MODES)}")
    if group not in INT4_GROUPS:  # checked whatever quant is: a typo should not pass silently
        raise ConfigError(f"unsupported --group {group}: {group} is not an int4 group size; "
                          f"choose {', '.join(map(str, INT4_GROUPS))}")
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output {out} already exists and is not empty (remove it or pass overwrite)")
    if (importance is not None or calibrate) and quant != "int4":
        raise ConfigError("importance and calibration weigh int4's rounding: they need --quant int4")
    source = open_source(src)
    cfg = source.config
    ranges = plan_stages(cfg.num_layers, stages, split)
    source.check_supported()  # fail on an unsupported quant type before writing anything
    imp_path = _importance_path(source, importance) if quant == "int4" else None
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        if imp_path is None and calibrate:
            source, imp_path = _calibrated_source(src, tmp / "dense", progress, calibration_ids)
        imp = _load_importance(imp_path, source)
        manifest = _convert_into(tmp, source, cfg, ranges, dtype, progress, quant, group, imp_path, imp)
        shutil.rmtree(tmp / "dense", ignore_errors=True)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _importance_path(source, importance: str | Path | None) -> Path | None:
    """The importance file int4 uses: the one named, else the source dir's own, else None."""
    from dllm.model.calibrate import IMPORTANCE_FILE

    if importance is not None:
        p = Path(importance)
        if not p.is_file():
            raise ConfigError(f"importance file {p} does not exist (dllm calibrate DIR writes DIR/{IMPORTANCE_FILE})")
        return p
    own = Path(source.path) / IMPORTANCE_FILE
    return own if source.kind == "hf" and own.is_file() else None


def _load_importance(path: Path | None, source) -> dict | None:
    """The importance file's vectors, checked against the source's matmul weights (one [in]
    vector per slot; a tied head's is the embedding's width)."""
    if path is None:
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from dllm.weights.quantized import is_matmul_weight, slot_key

    try:
        imp = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"importance file {path} cannot be read: {e}") from None
    for name in source.tensor_names():
        if is_matmul_weight(name):
            key, n_in = slot_key(name), source.shape(name)[1]
            if key not in imp or tuple(imp[key].shape) != (n_in,):
                got = tuple(imp[key].shape) if key in imp else "nothing"
                raise ConfigError(f"importance file {path} does not fit this model: {key} needs [{n_in}], "
                                  f"the file has {got} (measure it on this model: dllm calibrate DIR)")
    return imp


def _calibrated_source(src, dense_dir: Path, progress: bool, ids: list[int] | None):
    """Convert ``src`` dense (fp32) into ``dense_dir`` and measure its importance there:
    (that dir as the source, its importance file)."""
    from dllm.model.calibrate import write_importance

    convert(src, dense_dir, progress=progress)
    return open_source(dense_dir), write_importance(dense_dir, ids)


def _convert_into(tmp: Path, source, cfg, ranges, dtype: str, progress: bool, quant: str | None = None,
                  group: int = 32, imp_path: Path | None = None, importance: dict | None = None) -> Manifest:
    names = source.tensor_names()
    n = len(ranges)
    files = [f"stage-{i:02d}-of-{n:02d}.safetensors" for i in range(n)]
    by_stage = [[] for _ in ranges]
    for name in names:
        by_stage[stage_of(name, ranges)].append(name)
    extra = {"config.json": json.dumps(cfg.to_hf(), indent=2) + "\n", **tokenizer_files(source)}
    for fname, data in extra.items():
        _write_text(tmp / fname, data)
    from dllm.model.calibrate import importance_digest

    entries = [shard_entries(source, ns, dtype, quant, group, head_stage=(i == 0), importance=importance)
               for i, ns in enumerate(by_stage)]
    total = 0
    with tqdm(total=sum(map(len, entries)), desc=f"convert {Path(source.path).name}", unit="tensor",
              disable=not progress, file=sys.stderr) as bar:
        for fname, stage_entries in zip(files, entries):
            total += write_shard(tmp / fname, stage_entries, bar)
    qinfo = {"mode": quant, "group": group} if quant else None
    if qinfo and imp_path is not None:
        qinfo["importance_sha256"] = importance_digest(imp_path)
    index = {"metadata": {"total_size": total, "format": "dllm", "dtype": dtype, **({"quant": qinfo} if quant else {})},
             "weight_map": {e.name: files[i] for i, es in enumerate(entries) for e in es}}
    _write_text(tmp / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    written = [*extra, *files, INDEX_NAME]
    manifest = Manifest(
        files={f: file_entry(tmp / f) for f in written},
        stages=[StageEntry(f, r, embed=(i == 0), head=(i == 0)) for i, (f, r) in enumerate(zip(files, ranges))],
        dtype=dtype, num_layers=cfg.num_layers, source=source_info(source), quant=qinfo)
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
