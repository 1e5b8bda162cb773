"""Quantization at the command line: `convert --quant/--group`, `--dtype auto` / `--quant` on
run/stage/node (dllm.launch.resolve_precision), and stored = runtime quantization, bit for bit.

Tiny random models (hidden 64, intermediate 128: every matmul input is a multiple of 32, so
int4 group 32 fits) with a character-level tokenizer so that `dllm run` works end to end.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from dllm.batch import SeqChunk
from dllm.cli import main as cli
from dllm.convert import convert
from dllm.errors import WeightsError
from dllm.launch import local_engine, resolve_precision
from dllm.model.runner import StageRunner
from dllm.model.stage import StageModel
from dllm.sampling import SamplingParams
from dllm.weights.manifest import Manifest

from .conftest import make_tiny_hf

IDS = [5, 17, 33, 2, 90, 64, 11, 120, 7, 45]
PROMPT = "the cat sat on a mat"


def write_char_tokenizer(d) -> None:
    """A character-level tokenizer (tokenizer.json + tokenizer_config.json) over 128 ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [c for c in map(chr, range(32, 127))][: 128 - 3]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """arch -> HF dir: llama (separate head) and qwen2 (tied head, qkv bias)."""
    out = {}
    for arch in ("llama", "qwen2"):
        d = tmp_path_factory.mktemp(f"hf-{arch}")
        make_tiny_hf(arch, d, intermediate_size=128)
        write_char_tokenizer(d)
        out[arch] = d
    return out


@pytest.fixture(scope="module")
def dense(hf_dirs, tmp_path_factory):
    """arch -> dense fp32 converted dir."""
    root = tmp_path_factory.mktemp("dense")
    for arch, src in hf_dirs.items():
        convert(src, root / arch, progress=False)
    return {arch: root / arch for arch in hf_dirs}


def cli_convert(src, out, *args):
    r = CliRunner().invoke(cli, ["convert", str(src), str(out), *args])
    assert r.exit_code == 0, (r.output, r.exception)
    return r


@pytest.fixture(scope="module")
def quantized(hf_dirs, tmp_path_factory):
    """(arch, mode) -> a checkpoint converted through `dllm convert --quant mode` (group 32)."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for arch, src in hf_dirs.items():
        for mode in ("int8", "int4"):
            d = root / f"{arch}-{mode}"
            r = cli_convert(src, d, "--quant", mode, "--group", "32")
            assert f"quant {mode}" in r.output  # the summary line names the quantization
            out[arch, mode] = d
    return out


def logits_of(model: StageModel, ids=IDS) -> torch.Tensor:
    runner = StageRunner.for_tokens(model, 64)
    with torch.inference_mode():
        x = runner.forward(model.embed(torch.tensor(ids)), [SeqChunk(0, 0, len(ids))])
        return model.logits(x)


# ---- (a) the stored format is runtime quantization ------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_checkpoint_equals_runtime_quantization(dense, quantized, arch, mode):
    stored = StageModel.from_pretrained(quantized[arch, mode])
    runtime = StageModel.from_pretrained(dense[arch]).quantize(mode)
    assert stored.quant == runtime.quant == mode
    got, want = logits_of(stored), logits_of(runtime)
    assert torch.equal(got, want)
    assert not torch.equal(got, logits_of(StageModel.from_pretrained(dense[arch])))  # quantized for real
    # asking for the stored mode explicitly is the same load
    assert torch.equal(logits_of(StageModel.from_pretrained(quantized[arch, mode], quant=mode)), want)


def test_manifest_records_quant(quantized, dense):
    assert Manifest.load(quantized["llama", "int8"]).quant == {"mode": "int8", "group": 32}
    assert Manifest.load(quantized["llama", "int4"]).quant == {"mode": "int4", "group": 32}
    assert Manifest.load(dense["llama"]).quant is None


def test_split_quantized_checkpoint_loads_per_stage(hf_dirs, quantized, tmp_path):
    d = tmp_path / "split"
    r = cli_convert(hf_dirs["llama"], d, "--stages", "2", "--quant", "int4")
    assert "2 stage(s)" in r.output and "quant int4 (group 32, round to nearest)" in r.output
    m = Manifest.load(d)
    assert m.split() == [(0, 2), (2, 4)] and m.quant == {"mode": "int4", "group": 32}
    s0 = StageModel.from_pretrained(d, layers=range(2), embed=True, head=True)
    s1 = StageModel.from_pretrained(d, layers=range(2, 4), embed=False, head=False)
    assert s0.quant == s1.quant == "int4"
    whole = local_engine(quantized["llama", "int4"]).generate_all(IDS, SamplingParams(max_tokens=8, ignore_eos=True))
    chain = local_engine(d, stages=2).generate_all(IDS, SamplingParams(max_tokens=8, ignore_eos=True))
    assert chain == whole


# ---- (b) refusals ----------------------------------------------------------------------------------

def test_other_mode_on_quantized_checkpoint_is_refused(quantized):
    d = quantized["llama", "int4"]
    with pytest.raises(WeightsError, match="is a int4 checkpoint; it cannot run as int8"):
        StageModel.from_pretrained(d, quant="int8")
    with pytest.raises(WeightsError, match="is a int4 checkpoint; it cannot run as int8"):
        resolve_precision("auto", "int8", model_dir=d)
    with pytest.raises(WeightsError, match="cannot run unquantized"):
        resolve_precision("float32", "none", model_dir=d)
    r = CliRunner().invoke(cli, ["run", "--model", str(d), "--quant", "int8", "--prompt", "hi", "--raw"])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit)
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "cannot run as int8" in r.stderr


def dllm(*args):
    return subprocess.run([sys.executable, "-m", "dllm.cli", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_bad_quant_and_group_are_one_line_errors(hf_dirs, tmp_path, capsys):
    from tools.convert.__main__ import main as tools_convert

    src, out = hf_dirs["llama"], tmp_path / "o"
    for args, needle in [(["--quant", "int3"], "'int3' is not one of 'int8', 'int4'"),
                         (["--quant", "int4", "--group", "48"], "48 is not an int4 group size")]:
        r = dllm("convert", str(src), str(out), *args)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: "), r.stderr
        assert needle in r.stderr and "Traceback" not in r.stderr
    r = CliRunner().invoke(cli, ["run", "--model", str(src), "--quant", "int3", "--prompt", "hi"])
    assert r.exit_code == 2
    want = "error: Invalid value for '--quant': 'int3' is not one of 'none', 'int8', 'int4'."
    assert r.stderr.strip().splitlines() == [want]
    for args, needle in [(["--quant", "int3"], "unsupported --quant 'int3'"), (["--group", "48"], "--group 48")]:
        assert tools_convert([str(src), str(out), "-q", *args]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [err.strip()] and needle in err
    assert not out.exists()


# ---- (c) resolve_precision -------------------------------------------------------------------------

def test_resolve_precision_without_a_checkpoint():
    assert resolve_precision("auto") == ("float32", "int4")
    assert resolve_precision("auto", None, "cpu") == ("float32", "int4")
    assert resolve_precision("auto", "none") == ("float32", None)
    assert resolve_precision("auto", "int8") == ("float32", "int8")
    assert resolve_precision("auto", None, "cuda") == ("bfloat16", None)
    assert resolve_precision("auto", "int4", torch.device("cuda", 0)) == ("bfloat16", "int4")
    assert resolve_precision("float32") == ("float32", None)
    assert resolve_precision("fp32", None, "cuda") == ("float32", None)
    assert resolve_precision("bfloat16", "int4") == ("bfloat16", "int4")
    assert resolve_precision(torch.float16, "none") == ("float16", None)
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        resolve_precision("auto", "int3")
    with pytest.raises(ValueError, match="unknown dtype 'float64'"):
        resolve_precision("float64")


def test_resolve_precision_reads_the_checkpoint(dense, quantized, tmp_path):
    q8 = quantized["llama", "int8"]
    assert resolve_precision("auto", model_dir=q8) == ("float32", "int8")  # stored mode beats auto's int4
    assert resolve_precision("float32", model_dir=q8) == ("float32", "int8")
    assert resolve_precision("bfloat16", "int8", model_dir=q8) == ("bfloat16", "int8")
    assert resolve_precision("auto", None, "cuda", model_dir=q8) == ("bfloat16", "int8")
    assert resolve_precision("auto", model_dir=dense["llama"]) == ("float32", "int4")
    assert resolve_precision("float32", model_dir=dense["llama"]) == ("float32", None)
    # a dense model whose matmul widths take no int4 group: auto falls back to int8
    import transformers

    odd = tmp_path / "odd"
    transformers.LlamaConfig(hidden_size=64, intermediate_size=100, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128).save_pretrained(odd)
    assert resolve_precision("auto", model_dir=odd) == ("float32", "int8")
    assert resolve_precision("auto", "int4", model_dir=odd) == ("float32", "int4")  # explicit: as asked


def test_drafter_and_local_engine_take_auto(dense):
    from dllm.spec.drafters import ModelDrafter

    assert ModelDrafter.from_pretrained(dense["llama"], dtype="auto").model.quant == "int4"
    assert ModelDrafter.from_pretrained(dense["llama"]).model.quant is None  # library default: fp32 dense
    assert ModelDrafter.from_pretrained(dense["llama"], quant="int8").model.quant == "int8"
    assert local_engine(dense["llama"], dtype="auto").model.quant == "int4"
    assert local_engine(dense["llama"]).model.quant is None


# ---- (d) dllm run ----------------------------------------------------------------------------------

def expected_answer(model_dir, dtype, quant=None, max_tokens=8) -> str:
    """What `dllm run --raw` prints: the greedy tokens up to EOS, decoded, then a newline."""
    from dllm.config import ModelConfig
    from dllm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    eos = sorted(tok.eos_token_ids | set(ModelConfig.from_dir(model_dir).eos_token_ids))
    eng = local_engine(model_dir, dtype=dtype, quant=quant, eos_ids=eos)
    out = []
    for t in eng.generate(tok.encode(PROMPT), SamplingParams(max_tokens=max_tokens)):
        if t in eng.eos_ids:
            break
        out.append(t)
    return tok.decode(out) + "\n"


def run_cli(model_dir, *args) -> str:
    r = CliRunner().invoke(cli, ["run", "--model", str(model_dir), "--prompt", PROMPT, "--raw", "--max-tokens", "8",
                                 "--threads", "1", *args])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "tokens, prompt" in r.stderr
    return r.stdout


def test_run_dtype_auto_and_float32(dense):
    d = dense["llama"]
    assert run_cli(d, "--dtype", "auto") == expected_answer(d, "float32", "int4")
    assert run_cli(d) == expected_answer(d, "float32", "int4")  # auto is the default
    assert run_cli(d, "--dtype", "float32") == expected_answer(d, "float32")
    assert run_cli(d, "--dtype", "float32", "--quant", "int8") == expected_answer(d, "float32", "int8")


def test_run_auto_local_stages_equal_one_process(dense, monkeypatch):
    """The stage process gets the coordinator's resolved precision: the chain is the single process."""
    import dllm.net.local_cluster as lc

    cmds, popen = [], lc.subprocess.Popen

    def recording_popen(cmd, *a, **kw):
        cmds.append(cmd)
        return popen(cmd, *a, **kw)

    monkeypatch.setattr(lc.subprocess, "Popen", recording_popen)
    d = dense["llama"]
    # the reference is the same chain with the precision spelled out: hidden states cross the wire
    # in fp16, which can flip a near-tie of this tiny random model against the one-process run
    assert run_cli(d, "--local-stages", "2") == run_cli(d, "--local-stages", "2", "--dtype", "float32",
                                                        "--quant", "int4")
    cmds = cmds[:1]
    assert len(cmds) == 1 and " --dtype float32 " in " ".join(cmds[0]) and " --quant int4 " in " ".join(cmds[0])
