"""Activation importance (dllm/model/calibrate.py), the weighted int4 search it feeds
(cpu_quant.quantize_int4) and the quantized-weight cache (dllm/model/quant_cache.py).

No real model: odd random shapes and the session's tiny random llama, converted so it has a manifest.
"""
import pytest
import torch

from dllm.convert import convert
from dllm.model import quant_cache
from dllm.model.calibrate import IMPORTANCE_FILE, load_importance, measure_importance, write_importance
from dllm.model.cpu_quant import CpuInt4Weight, Int8Weight, quantize_int4, unpack_int4
from dllm.model.stage import StageModel
from tests.test_cpu_quant import dense_forward


def weighted_error(w, parts, importance, g):
    """Per-group error under quantize_int4's weight: imp_i * sqrt(mean(w^2) + w_i^2) * (w - w')^2."""
    q, s, m = parts
    n_out, n_in = w.shape
    x = w.reshape(n_out, n_in // g, g)
    deq = unpack_int4(q).float().reshape(n_out, n_in // g, g) * s[..., None] + m[..., None]
    wt = importance.reshape(1, -1, g) * torch.sqrt((x * x).mean(-1, keepdim=True) + x * x)
    return (wt * (deq - x) ** 2).sum(-1)


@pytest.mark.parametrize("shape,group", [((48, 96), 32), ((208, 160), 32), ((16, 576), 64), ((80, 256), 128)])
def test_weighted_int4_never_worse_than_round_to_nearest(shape, group):
    torch.manual_seed(shape[0] * 1000 + shape[1])
    w = torch.randn(shape) * torch.rand(shape[1]) ** 2  # columns of very different size
    w[0, :group] = 0.5  # a constant group: one code, any scale
    importance = torch.rand(shape[1]) ** 6 * 100  # a few columns matter far more than the rest
    rtn = weighted_error(w, quantize_int4(w, group), importance, group)
    ours = weighted_error(w, quantize_int4(w, group, importance), importance, group)
    assert torch.all(ours <= rtn * (1 + 1e-5) + 1e-9)
    assert ours.sum() < 0.8 * rtn.sum()  # and much better where importance is uneven
    with pytest.raises(ValueError, match="one value per input column"):
        quantize_int4(w, group, torch.ones(shape[1] + 1))


@pytest.fixture(scope="module")
def llama_dir(tiny_models, tmp_path_factory):
    d, _ = tiny_models["llama"]
    out = tmp_path_factory.mktemp("calib") / "llama"
    convert(d, out, progress=False)
    return out


def test_importance_is_the_mean_squared_input_of_each_matmul(llama_dir):
    stage = StageModel.from_pretrained(llama_dir)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    imp = measure_importance(stage, ids)
    assert list(imp) == list(stage.slot_keys())
    x0 = stage.layers[0].input_norm(stage.embed(torch.tensor(ids)))  # what layer 0's q|k|v multiply
    torch.testing.assert_close(imp["layers.0.qkv"], (x0 * x0).mean(0), rtol=1e-5, atol=1e-7)
    hidden = dense_forward(stage, torch.tensor(ids))  # the model still runs, weights put back dense
    h = stage.norm(hidden)[:-1]  # the head scores every position but the last (nothing to predict)
    torch.testing.assert_close(imp["head"], (h * h).mean(0), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="dense model"):
        measure_importance(StageModel.from_pretrained(llama_dir, quant="int8"), ids)


def logits(stage, ids=(1, 5, 9, 2, 7)):
    return stage.logits(dense_forward(stage, torch.tensor(ids)))


def test_int4_load_uses_importance_and_cache(llama_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("DLLM_CACHE", str(tmp_path / "cache"))
    assert load_importance(llama_dir) is None
    plain = StageModel.from_pretrained(llama_dir, quant="int4")
    assert isinstance(plain.layers[0].attn.qkv_weight, Int8Weight)  # the int4 recipe keeps q|k|v int8
    assert isinstance(plain.layers[0].mlp.gate_up_weight, CpuInt4Weight)
    write_importance(llama_dir, ids=[(7 * i) % 97 for i in range(40)])  # tiny model: no tokenizer
    try:
        imp = load_importance(llama_dir)
        weighted = StageModel.from_pretrained(llama_dir, quant="int4")
        assert not torch.equal(logits(weighted), logits(plain))  # a new importance, a new cache entry
        want = quantize_int4(StageModel.from_pretrained(llama_dir).layers[1].mlp.down_weight.dense(), 32,
                             imp["layers.1.down"])
        got = weighted.layers[1].mlp.down_weight
        torch.testing.assert_close(got.dequantize(), CpuInt4Weight(*want).dequantize(), rtol=0, atol=0)
        entries = list((tmp_path / "cache" / "quant").iterdir())
        assert len(entries) == 2
        # a second load reads the cache (quantize_int4 is not called) and gives the same model
        monkeypatch.setattr("dllm.weights.quantized.quantize_int4", None)
        again = StageModel.from_pretrained(llama_dir, quant="int4")
        assert torch.equal(logits(again), logits(weighted))
        # stages of a split read the whole model's slots: the same weights layer for layer
        n = again.config.num_layers
        tail = StageModel.from_pretrained(llama_dir, layers=range(n // 2, n), embed=False, head=False, quant="int4")
        assert torch.equal(tail.layers[0].mlp.gate_up_weight.dequantize(),
                           again.layers[n // 2].mlp.gate_up_weight.dequantize())
        # a damaged cache file is quantized again, not trusted
        monkeypatch.undo()
        monkeypatch.setenv("DLLM_CACHE", str(tmp_path / "cache"))
        damaged = [f for entry in entries for f in entry.glob("*.safetensors")]
        assert damaged
        for f in damaged:
            f.write_bytes(b"not a safetensors file")
        assert torch.equal(logits(StageModel.from_pretrained(llama_dir, quant="int4")), logits(weighted))
    finally:
        (llama_dir / IMPORTANCE_FILE).unlink()


def test_calibrate_cli_refuses_a_quantized_checkpoint(tiny_models, tmp_path):
    from click.testing import CliRunner

    from dllm.cli import main

    d, _ = tiny_models["llama"]
    out = tmp_path / "q8"
    convert(d, out, progress=False, quant="int8")
    r = CliRunner().invoke(main, ["calibrate", str(out)])
    assert r.exit_code != 0 and "importance is measured on dense weights" in r.output
    assert not (out / IMPORTANCE_FILE).exists()


def same_matmuls(a: StageModel, b: StageModel) -> bool:
    """Every matmul slot of two quantized stages holds bit-identical buffers."""
    return all(all(torch.equal(x, y) for x, y in zip(getattr(ma, na).buffers(), getattr(mb, nb).buffers()))
               for (_, ma, na), (_, mb, nb) in zip(a.matmul_slots(), b.matmul_slots()))


def test_int4_convert_uses_importance_and_equals_the_runtime(llama_dir, monkeypatch, tmp_path):
    from dllm.model.calibrate import importance_digest
    from dllm.weights.manifest import Manifest

    monkeypatch.setenv("DLLM_CACHE", str(tmp_path / "cache"))
    write_importance(llama_dir, ids=[(5 * i) % 89 for i in range(40)])
    try:
        m = convert(llama_dir, tmp_path / "q4", progress=False, quant="int4", stages=2)  # the dir's own importance
        assert m.quant["importance_sha256"] == importance_digest(llama_dir) != ""
        assert Manifest.load(tmp_path / "q4").quant == m.quant
        runtime = StageModel.from_pretrained(llama_dir, quant="int4")
        converted = StageModel.from_pretrained(tmp_path / "q4")
        assert same_matmuls(converted, runtime)  # q, k, v quantized alone = their fused q|k|v
        assert torch.equal(logits(converted), logits(runtime))
        rtn = convert(llama_dir, tmp_path / "rtn", progress=False, quant="int4",
                      importance=_rtn_importance(tmp_path, llama_dir))
        assert not same_matmuls(StageModel.from_pretrained(tmp_path / "rtn"), runtime)
        assert rtn.quant["importance_sha256"] != m.quant["importance_sha256"]
    finally:
        (llama_dir / IMPORTANCE_FILE).unlink()


def _rtn_importance(tmp_path, model_dir):
    """An importance file of all ones: weights every column alike (not the measured one)."""
    from safetensors.torch import save_file

    imp = load_importance(model_dir)
    path = tmp_path / "flat.safetensors"
    save_file({k: torch.ones_like(v) for k, v in imp.items()}, str(path))
    return path


def test_convert_calibrate_measures_importance_first(tiny_models, tmp_path, monkeypatch):
    import shutil

    from dllm.errors import ConfigError
    from dllm.model import calibrate

    src, _ = tiny_models["llama"]  # an HF dir with no importance
    ids = [(3 * i) % 97 for i in range(40)]
    measured, measure = [], calibrate.write_importance

    def keep_copy(model_dir, ids=None):  # the scratch dir goes away: keep what was measured there
        path = measure(model_dir, ids)
        measured.append((model_dir, shutil.copy(path, tmp_path / "measured.safetensors")))
        return path

    monkeypatch.setattr(calibrate, "write_importance", keep_copy)
    m = convert(src, tmp_path / "q4", progress=False, quant="int4", calibrate=True, calibration_ids=ids)
    monkeypatch.undo()
    [(scratch, copy)] = measured
    assert scratch.name == "dense" and scratch.parent.parent == tmp_path  # measured inside OUT's scratch dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["measured.safetensors", "q4"]  # no scratch dir left
    assert not (tmp_path / "q4" / "dense").exists() and "dense" not in str(m.files)
    # measured on the dense model, then used: the same as converting with that file by hand
    by_hand = convert(src, tmp_path / "by-hand", progress=False, quant="int4", importance=copy)
    assert by_hand.quant == m.quant
    assert same_matmuls(StageModel.from_pretrained(tmp_path / "q4"), StageModel.from_pretrained(tmp_path / "by-hand"))
    imp = copy
    with pytest.raises(ConfigError, match="need --quant int4"):
        convert(src, tmp_path / "q8", progress=False, quant="int8", calibrate=True)
    with pytest.raises(ConfigError, match="does not exist"):
        convert(src, tmp_path / "x", progress=False, quant="int4", importance=tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot be read"):
        convert(src, tmp_path / "y", progress=False, quant="int4", importance=tmp_path / "bad.safetensors")
    from safetensors.torch import load_file, save_file

    other = {k: v[:-1] if k == "layers.1.down" else v for k, v in load_file(str(imp)).items()}
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match=r"does not fit this model: layers\.1\.down needs"):
        convert(src, tmp_path / "z", progress=False, quant="int4", importance=tmp_path / "other.safetensors")
    assert not any((tmp_path / n).exists() for n in "xyz")


def test_convert_cli_importance_and_calibrate_flags(llama_dir, tiny_models, tmp_path):
    from click.testing import CliRunner

    from dllm.cli import main

    write_importance(llama_dir, ids=[(5 * i) % 89 for i in range(40)])
    try:
        imp = tmp_path / "imp.safetensors"
        imp.write_bytes((llama_dir / IMPORTANCE_FILE).read_bytes())
        src, _ = tiny_models["llama"]
        r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "q4"), "--quant", "int4", "--importance", str(imp)])
        assert r.exit_code == 0, r.output
        assert "quant int4 (group 32, activation-weighted)" in r.output
        r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "q8"), "--quant", "int8", "--importance", str(imp)])
        assert r.exit_code != 0 and "need --quant int4" in r.output and not (tmp_path / "q8").exists()
    finally:
        (llama_dir / IMPORTANCE_FILE).unlink()
