"""convert(): per-stage shards whose union is the source, a correct manifest, atomic output.

Uses SmolLM2-135M (30 layers, tied head): each conversion writes ~540 MB (fp32) in a few seconds.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dllm.config import ModelConfig
from dllm.convert import SplitError, check_split, convert, even_split, parse_split, plan_stages, stage_of
from dllm.errors import ConfigError, UnsupportedQuantError
from dllm.weights.gguf_import import GGUFSource
from dllm.weights.manifest import Manifest, sha256_file

from .models import gguf_or_skip as fetch_or_skip




@pytest.fixture(scope="module")
def smollm2():
    path = fetch_or_skip("smollm2")
    return path, GGUFSource(path)


def read_shard(path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def check_model_dir(out, src: GGUFSource, ranges, dtype=torch.float32):
    """Shards partition the source exactly (right stage, equal values); manifest and index agree."""
    m = Manifest.load(out)
    assert m.split() == ranges and m.num_layers == src.config.num_layers
    assert [(s.embed, s.head) for s in m.stages] == [(i == 0, i == 0) for i in range(len(ranges))]
    on_disk = {p.name for p in out.iterdir()} - {"manifest.json"}
    assert set(m.files) == on_disk  # every written file is listed, and nothing else
    for name, entry in m.files.items():
        assert entry == {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}, name
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    seen = {}
    for i, stage in enumerate(m.stages):
        shard = read_shard(out / stage.file)
        assert not set(shard) & set(seen), "a tensor is in two shards"
        for name, t in shard.items():
            assert stage_of(name, ranges) == i and index[name] == stage.file, name
            assert t.dtype == dtype and torch.equal(t, src.load(name).to(dtype)), name
        seen.update(shard)
    assert set(seen) == set(src.tensor_names()) == set(index)
    assert ModelConfig.from_dir(out) == src.config
    assert json.loads((out / "config.json").read_text()) == src.config.to_hf()
    return m


def test_convert_two_stages(smollm2, tmp_path):
    path, src = smollm2
    out = tmp_path / "m2"
    stale = tmp_path / ".m2.partial-4194305"  # left by a killed convert (above Linux's max pid)
    stale.mkdir()
    m = convert(path, out, stages=2, progress=False)
    assert m.split() == [(0, 15), (15, 30)]
    check_model_dir(out, src, [(0, 15), (15, 30)])
    stage0 = read_shard(out / "stage-00-of-02.safetensors")
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= set(stage0)
    assert "lm_head.weight" not in stage0  # tied: the coordinator reuses the embedding
    assert m.source == {"kind": "gguf", "name": path.name, "sha256": sha256_file(path)}
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(m.files)
    assert list(tmp_path.iterdir()) == [out]  # stale partial removed, no new one left


def test_cli_split_bfloat16_then_hf_dir_roundtrip(smollm2, tmp_path):
    """tools.convert with --split/--dtype, then that output (an HF-style dir) converted again."""
    from tools.convert.__main__ import main
    path, src = smollm2
    out = tmp_path / "split"
    assert main([str(path), str(out), "--split", "0:4,4:29,29:30", "--dtype", "bfloat16", "-q"]) == 0
    check_model_dir(out, src, [(0, 4), (4, 29), (29, 30)], dtype=torch.bfloat16)
    again = tmp_path / "again"
    m = convert(out, again, stages=3, dtype="bfloat16", progress=False)
    assert m.split() == [(0, 10), (10, 20), (20, 30)] and m.source["kind"] == "hf"
    check_model_dir(again, src, m.split(), dtype=torch.bfloat16)
    assert (again / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("split,msg", [
    ("0:10,12:30", "gap at layer 10"),
    ("0:15,14:30", "overlap at layer 15"),
    ("0:15", "ends at layer 15 but the model has 30 layers"),
    ("0:15,15:15,15:30", "range 15:15 is empty"),
    ("0:15,15:40", "ends at layer 40"),
    ("5:30", "should start at 0"),
    ("0-15,15:30", "bad split range"),
])
def test_bad_split_rejected(split, msg):
    with pytest.raises(SplitError, match=msg):
        plan_stages(30, split=split)


@pytest.mark.parametrize("stages", [0, 31, -1])
def test_bad_stage_count_rejected(stages):
    with pytest.raises(SplitError, match="out of range"):
        plan_stages(30, stages=stages)


def test_split_helpers():
    assert even_split(30, 4) == [(0, 7), (7, 14), (14, 22), (22, 30)]  # extra layers away from stage 0
    assert even_split(24, 1) == [(0, 24)]
    assert parse_split(" 0:12, 12:24 ") == [(0, 12), (12, 24)]
    assert check_split([(0, 12), (12, 24)], 24) == [(0, 12), (12, 24)]
    ranges = [(0, 12), (12, 24)]
    assert stage_of("model.embed_tokens.weight", ranges) == 0
    assert stage_of("lm_head.weight", ranges) == 0
    assert stage_of("model.layers.11.mlp.up_proj.weight", ranges) == 0
    assert stage_of("model.layers.12.mlp.up_proj.weight", ranges) == 1


def test_bad_split_via_cli_writes_nothing(smollm2, tmp_path, capsys):
    from tools.convert.__main__ import main
    path, _ = smollm2
    assert main([str(path), str(tmp_path / "o"), "--split", "0:10,11:30", "-q"]) == 2
    assert "gap at layer 10" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_leaves_nothing(smollm2, tmp_path, monkeypatch):
    path, _ = smollm2
    calls = {"n": 0}
    real_load = GGUFSource.load

    def flaky(self, name):
        calls["n"] += 1
        if calls["n"] == 40:
            raise RuntimeError("simulated crash")
        return real_load(self, name)

    monkeypatch.setattr(GGUFSource, "load", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert(path, tmp_path / "m", stages=2, progress=False)
    assert list(tmp_path.iterdir()) == []  # no OUT and no leftover partial dir


def test_existing_output_refused_unless_overwrite(smollm2, tmp_path):
    path, _ = smollm2
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="already exists"):
        convert(path, out, progress=False)
    assert (out / "keep.txt").exists()


def test_unsupported_quant_stops_before_writing(tmp_path):
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    from tests.test_gguf_import import HIDDEN, VOCAB, write_gguf
    block, size = GGML_QUANT_SIZES[Q.Q8_K]
    path = write_gguf(tmp_path / "u.gguf", {
        "token_embd.weight": (np.zeros((VOCAB, HIDDEN), np.float32), Q.F32),
        "blk.0.ffn_down.weight": (np.zeros((HIDDEN, 256 // block * size), np.uint8), Q.Q8_K)})
    with pytest.raises(UnsupportedQuantError, match=r"blk\.0\.ffn_down\.weight.*Q8_K"):
        convert(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_dtype_and_missing_source(tmp_path):
    from dllm.errors import WeightsError
    with pytest.raises(ConfigError, match="float8"):
        convert(tmp_path / "x.gguf", tmp_path / "o", dtype="float8")
    with pytest.raises(WeightsError, match="not found"):
        convert(tmp_path / "x.gguf", tmp_path / "o")
