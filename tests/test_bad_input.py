"""Bad input gets one clear error line naming the cause, never a traceback."""
import shutil
import subprocess
import sys

import pytest

from dllm.convert import convert
from dllm.errors import WeightsError
from dllm.model.stage import StageModel

from .conftest import make_tiny_hf


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    src = tmp_path_factory.mktemp("hf")
    make_tiny_hf("llama", src)
    out = tmp_path_factory.mktemp("conv") / "model"
    convert(src, out, stages=2, progress=False)
    return out


def dllm(*args):
    return subprocess.run([sys.executable, "-m", "dllm.cli", *args], capture_output=True, text=True, timeout=120)


def fresh_copy(converted, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(converted, d)
    return d


def test_missing_shard_is_named(converted, tmp_path):
    d = fresh_copy(converted, tmp_path)
    (d / "stage-01-of-02.safetensors").unlink()
    with pytest.raises(WeightsError, match="missing shard stage-01-of-02.safetensors"):
        StageModel.from_pretrained(d)
    # a stage that does not need that shard still loads: it reads only its own files
    StageModel.from_pretrained(d, layers=range(0, 2), embed=True, head=True)


def test_sha256_mismatch_is_named(converted, tmp_path):
    d = fresh_copy(converted, tmp_path)
    shard = d / "stage-00-of-02.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="stage-00-of-02.safetensors: sha256 mismatch"):
        StageModel.from_pretrained(d)


def test_cli_errors_are_one_line(converted, tmp_path):
    cases = [
        (["run", "--model", str(converted), "--prompt", "   "], "empty prompt"),
        (["stage", "--model", str(converted), "--layers", "2:99", "--identity", str(tmp_path / "none.key")],
         "does not exist"),
        (["run", "--model", str(tmp_path / "nowhere"), "--prompt", "hi"], "not a path and not a known model"),
        (["convert", str(converted), str(tmp_path / "o"), "--split", "0:1,2:4"], "split"),
        (["plan", "--shape", "qwen2.5-32b", "--gpus", "24,24", "--quant", "bfloat16"], "does not fit"),
    ]
    for args, needle in cases:
        r = dllm(*args)
        assert r.returncode != 0, args
        assert needle in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr, (args, r.stderr)


def test_layer_range_out_of_bounds_on_a_stage(converted, tmp_path):
    from dllm.net.crypto import Identity

    key = tmp_path / "s.key"
    Identity.generate().save(key)
    r = dllm("stage", "--model", str(converted), "--layers", "2:99", "--identity", str(key), "--listen", "127.0.0.1:0")
    assert r.returncode != 0 and "outside the model's 0:4" in r.stderr and "Traceback" not in r.stderr
