"""manifest.json: which files a converted model has, their sha256, and the per-stage split.

Format (``"format": "dllm-manifest/1"``)::

    {
      "format": "dllm-manifest/1",
      "source": {"kind": "gguf" | "hf", "name": "...", "sha256": "..."},
      "dtype": "float32",
      "num_layers": 30,
      "quant": {"mode": "int4", "group": 32, "importance_sha256": "…"},  (only in a quantized checkpoint, dllm/weights/quantized.py; the sha256 only when int4 was activation-weighted)
      "stages": [{"file": "stage-00-of-02.safetensors", "layers": [0, 15], "embed": true, "head": true},
                 {"file": "stage-01-of-02.safetensors", "layers": [15, 30], "embed": false, "head": false}],
      "files": {"stage-00-of-02.safetensors": {"sha256": "…", "bytes": 123}, "config.json": {…}, …}
    }

Stage 0 is the coordinator's shard: it also carries the embedding, the final norm and the head,
because the coordinator holds those. A stage verifies only the files it opens.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from dllm.errors import WeightsError

FORMAT = "dllm-manifest/1"
MANIFEST_NAME = "manifest.json"


@dataclass
class StageEntry:
    file: str
    layers: tuple[int, int]
    embed: bool = False
    head: bool = False


@dataclass
class Manifest:
    files: dict[str, dict]
    stages: list[StageEntry] = field(default_factory=list)
    dtype: str = "float32"
    num_layers: int = 0
    source: dict = field(default_factory=dict)
    quant: dict | None = None  # {"mode": "int8" | "int4", "group": 128} for a quantized checkpoint

    @classmethod
    def load(cls, model_dir: str | Path) -> "Manifest | None":
        p = Path(model_dir) / MANIFEST_NAME
        if not p.is_file():
            return None
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise WeightsError(f"{p} is not valid JSON: {e}") from None
        if d.get("format") != FORMAT:
            raise WeightsError(f"{p}: unknown manifest format {d.get('format')!r}, expected {FORMAT!r}")
        stages = [StageEntry(s["file"], tuple(s["layers"]), s.get("embed", False), s.get("head", False))
                  for s in d.get("stages", [])]
        return cls(files=d["files"], stages=stages, dtype=d.get("dtype", "float32"),
                   num_layers=d.get("num_layers", 0), source=d.get("source", {}), quant=d.get("quant"))

    def save(self, model_dir: str | Path) -> None:
        d = {
            "format": FORMAT,
            "source": self.source,
            "dtype": self.dtype,
            "num_layers": self.num_layers,
            **({"quant": self.quant} if self.quant else {}),
            "stages": [{"file": s.file, "layers": list(s.layers), "embed": s.embed, "head": s.head} for s in self.stages],
            "files": self.files,
        }
        (Path(model_dir) / MANIFEST_NAME).write_text(json.dumps(d, indent=2) + "\n")

    def split(self) -> list[tuple[int, int]]:
        """The layer ranges of the stages, in order."""
        return [s.layers for s in self.stages]

    def verify(self, model_dir: str | Path, filenames) -> None:
        """Check each named file exists and matches its recorded sha256; raise WeightsError naming it."""
        for name in filenames:
            entry = self.files.get(name)
            path = Path(model_dir) / name
            if not path.is_file():
                raise WeightsError(f"missing shard {name} in {model_dir}")
            if entry is None:
                raise WeightsError(f"{name} is not listed in {Path(model_dir) / MANIFEST_NAME}")
            if path.stat().st_size != entry["bytes"]:
                raise WeightsError(f"{name}: size {path.stat().st_size} != {entry['bytes']} in manifest (truncated or replaced)")
            got = sha256_file_cached(path)
            if got != entry["sha256"]:
                raise WeightsError(f"{name}: sha256 mismatch (file {got[:16]}…, manifest {entry['sha256'][:16]}…): corrupt or replaced")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def file_entry(path: str | Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": Path(path).stat().st_size}


def sha256_file_cached(path: str | Path) -> str:
    """sha256 of a file, memoised on (path, size, mtime_ns, inode) in the dllm cache dir.

    Hashing a 6 GB shard costs seconds on every start; a file whose size, mtime and inode are
    unchanged since we hashed it is the same file unless someone edits it in place and restores
    the mtime on purpose.
    """
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    memo_path = Path(os.environ.get("DLLM_CACHE", Path.home() / ".cache" / "dllm")) / "sha256-memo.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = sha256_file(path)
    memo[key] = digest
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_path)
    except OSError:
        pass  # the memo is an optimisation only
    return digest
