"""dllm.tokenizer + dllm.weights.gguf_tokenizer against transformers' own GGUF tokenizer conversion.

Real GGUFs (SmolLM2-135M: pre "smollm"; Qwen2.5-Coder-0.5B: pre "qwen2") come from dllm.fetch; the
oracle is `AutoTokenizer.from_pretrained(dir, gguf_file=...)`. Streaming/stop tests are seeded
random properties checked against decode(all) and a char-by-char reference.
"""
from __future__ import annotations

import json
import random

import pytest

from dllm.tokenizer import StopChecker, StreamDecoder, Tokenizer, TokenizerError

MODELS = ["smollm2", "qwen-coder-0.5b"]

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "I'm sure you're right, they'll've gone; we'd LOVE it. DON'T 'S 'Ll",
    "def fib(n):\n\tif n < 2:\n\t\treturn n\n    return fib(n - 1) + fib(n - 2)  # tabs & spaces\n",
    "for (int i = 0; i < 10; ++i) {\n        x[i] = i * 3.14;\n    }\n",
    "1234567 3.14 0.001 -42 1e10 2024-01-31 12:30:59 $1,000,000.99 100%",
    "數字 1234567 和 3.14，中文测试。日本語のテキスト、カタカナ。한국어 문장입니다.",
    "emoji 😀👍🏽 👨‍👩‍👧 🇫🇷 ok ✓ → ∑ café naïve Straße",
    "x²+½ ١٢٣ ٤ Ⅻ ③",  # non-ASCII numerals: where the two GGUF oracles for "smollm" part ways
    "   leading spaces\n\n\n   \t\t trailing   ",
    "     ",
    "\n\n\n\n",
    "a\r\nb\rc\n\r\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <|im_end|>tail",
    '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>',
    "https://example.com/a/b?c=d&e=f#g  user@example.org",
    "",
]


def _gguf_path(name: str):
    try:
        from dllm.fetch import ensure_gguf
    except ImportError as e:
        pytest.skip(f"dllm.fetch unavailable: {e}")
    try:
        return ensure_gguf(name)
    except Exception as e:  # no network / no cache: skip, don't fail the tokenizer suite
        pytest.skip(f"ensure_gguf({name!r}) failed: {e}")


@pytest.fixture(scope="module", params=MODELS)
def pair(request, tmp_path_factory):
    """(ours: Tokenizer from a written model dir, oracle: transformers tokenizer, gguf facts)."""
    import gguf
    from pathlib import Path

    from transformers import AutoTokenizer

    from dllm.weights.gguf_tokenizer import build_tokenizer_files

    path = Path(_gguf_path(request.param))
    reader = gguf.GGUFReader(path)
    files = build_tokenizer_files(reader)
    facts = {k: reader.fields[k].contents() for k in
             ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.pre", "general.architecture")}
    facts["n_tokens"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    arch = facts["general.architecture"]
    facts["context_length"] = reader.fields[f"{arch}.context_length"].contents()
    del reader
    out = tmp_path_factory.mktemp(request.param)
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    oracle = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return Tokenizer.from_dir(out), oracle, facts


def _oracle_ids(oracle, text: str, facts: dict, add_special_tokens=False) -> list[int]:
    """The oracle's ids, with SmolLM2's own split for "smollm".

    transformers gives a "smollm" vocab plain GPT-2 splitting, but SmolLM2's tokenizer.json (and
    llama.cpp's "smollm" regex) first cut out every \\p{N} char. The two differ only on non-ASCII
    numerals after a space (" ١"), so for those we rebuild SmolLM2's pipeline from HF's own parts.
    """
    from tokenizers import pre_tokenizers as P

    backend = oracle.backend_tokenizer
    saved = backend.pre_tokenizer
    if facts["tokenizer.ggml.pre"] == "smollm":
        backend.pre_tokenizer = P.Sequence([P.Digits(individual_digits=True),
                                            P.ByteLevel(add_prefix_space=False, use_regex=True)])
    try:
        return oracle.encode(text, add_special_tokens=add_special_tokens)
    finally:
        backend.pre_tokenizer = saved


def test_encode_matches_transformers(pair):
    ours, oracle, facts = pair
    for text in CORPUS:
        assert ours.encode(text) == _oracle_ids(oracle, text, facts), text
        assert ours.encode(text, add_special_tokens=True) == _oracle_ids(oracle, text, facts, True), text
        if not any(c in text for c in "١٢٣٤Ⅻ③²½"):  # the unpatched oracle agrees on everything else
            assert ours.encode(text) == oracle.encode(text, add_special_tokens=False), text


def test_encode_random_strings_match(pair):
    ours, oracle, facts = pair
    pieces = list("abXY  \t\n\r09.,'\"!?-_()[]{}<>|/\\:;=+*&%$#@~`éß中文日本한😀👍🏽\u200d\u00a0") + [
        "'s", "'LL", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "    ", "\n\n", " 12", "١٢"]
    rng = random.Random(1)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        assert ours.encode(text) == _oracle_ids(oracle, text, facts), text


def test_decode_roundtrip(pair):
    ours, _, _ = pair
    for text in CORPUS:
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    ids = ours.encode("<|im_start|>hi<|im_end|>")
    assert ours.decode(ids) == "hi"  # control tokens are special: skipped by default
    call = '<tool_call>{"x": 1}</tool_call>'  # user-defined in Qwen: matched whole, yet kept as text
    assert ours.decode(ours.encode(call)) == call


def test_chat_template_matches_transformers(pair):
    ours, oracle, _ = pair
    convo = [{"role": "system", "content": "You are terse. Use <b>&</b> freely."},
             {"role": "user", "content": "What's 2+2?\nAnswer in digits."},
             {"role": "assistant", "content": "4"},
             {"role": "user", "content": "And 数字 × 3? 😀"}]
    for messages in (convo, convo[1:]):
        for gen in (True, False):
            want = oracle.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == want
        assert ours.encode_chat(messages) == oracle.encode(
            oracle.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)


def test_special_ids_and_config(pair):
    ours, oracle, facts = pair
    assert ours.vocab_size == facts["n_tokens"]
    assert facts["tokenizer.ggml.eos_token_id"] in ours.eos_token_ids
    # Both are ChatML models: the template's turn terminator must count as end of generation.
    assert ours.token_to_id("<|im_end|>") in ours.eos_token_ids
    assert ours.eos_token == oracle.eos_token and ours.bos_token == oracle.bos_token
    assert ours.config["model_max_length"] == facts["context_length"]
    assert ours.config["add_bos_token"] is False and ours.config["add_eos_token"] is False


def test_bad_messages_raise(pair):
    ours, _, _ = pair
    with pytest.raises(TokenizerError, match="non-empty"):
        ours.apply_chat_template([])
    with pytest.raises(TokenizerError, match="non-string content"):
        ours.apply_chat_template([{"role": "user", "content": None}])
    with pytest.raises(TokenizerError, match="non-string content"):
        ours.encode_chat([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    with pytest.raises(TokenizerError, match="role"):
        ours.apply_chat_template([{"content": "hi"}])


def test_stream_decoder_matches_decode(pair):
    ours, _, _ = pair
    rng = random.Random(2)
    alphabet = "aé中😀👍🏽\u200d한 \n1"
    split_chars = 0
    for case in range(150):
        if case % 3:  # real text, heavy in multibyte chars: tokens often end mid-character
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25)))
            ids = ours.encode(text)
            split_chars += sum("\ufffd" in ours.decode([i]) for i in ids)
        else:  # arbitrary ids, specials included: deltas must still add up to decode(all)
            ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 20))]
            text = None
        for skip in (True, False):
            dec = StreamDecoder(ours, skip_special_tokens=skip)
            deltas = [dec.feed(i) for i in ids]
            tail = dec.flush()
            assert "".join(deltas) + tail == ours.decode(ids, skip_special_tokens=skip)
            if text is not None:
                assert tail == "" and not any("\ufffd" in d for d in deltas)  # never half a character
                assert "".join(deltas) == text
    assert split_chars > 20  # the property was exercised on characters split across tokens


def _stop_reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Char-by-char: the first prefix that ends with a stop; cut at the longest stop ending there."""
    for n in range(1, len(text) + 1):
        hits = [s for s in stops if s and text[:n].endswith(s)]
        if hits:
            return text[: n - max(map(len, hits))], True
    return text, False


def test_stop_checker_random():
    rng = random.Random(3)
    for _ in range(400):
        text = "".join(rng.choice("ab c\n") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("ab c\n") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        checker, emitted, stopped, i = StopChecker(stops), "", False, 0
        while i < len(text) and not stopped:
            j = i + rng.randint(0, 5)  # empty deltas included
            out, stopped = checker.feed(text[i:j])
            emitted, i = emitted + out, j
            want, _ = _stop_reference(text[:i], stops)
            assert want.startswith(emitted)  # nothing emitted that a later stop could take back
            if not stopped:  # everything not emitted is a possible stop prefix, so shorter than a stop
                assert len(text[:i]) - len(emitted) < max(map(len, stops))
        if not stopped:
            emitted += checker.flush()
        assert (emitted, stopped) == _stop_reference(text, stops), (text, stops)


def test_stream_then_stop_across_token_boundaries(pair):
    """A stop string spanning several tokens (and split UTF-8 chars) is cut exactly."""
    ours, _, _ = pair
    rng = random.Random(4)
    for _ in range(60):
        text = "".join(rng.choice(["ab", " ", "中", "😀", "\n", "End", "ing"]) for _ in range(rng.randint(2, 20)))
        a = rng.randrange(len(text))
        stop = text[a: a + rng.randint(1, 6)]
        dec, checker, emitted, stopped = StreamDecoder(ours), StopChecker([stop]), "", False
        for tid in ours.encode(text):
            out, stopped = checker.feed(dec.feed(tid))
            emitted += out
            if stopped:
                break
        assert stopped and emitted == text[: text.find(stop)]


def test_from_dir_missing(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


class _Field:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


class _Reader:
    def __init__(self, **fields):
        self.fields = {k.replace("__", "."): _Field(v) for k, v in fields.items()}


def test_unsupported_gguf_tokenizers_name_the_cause():
    from dllm.weights.gguf_tokenizer import build_tokenizer_files

    base = dict(tokenizer__ggml__tokens=["a", "b", "ab"], tokenizer__ggml__merges=["a b"])
    with pytest.raises(TokenizerError, match="'llama'"):
        build_tokenizer_files(_Reader(tokenizer__ggml__model="llama", **base))
    with pytest.raises(TokenizerError, match="'mystery-pre'"):
        build_tokenizer_files(_Reader(tokenizer__ggml__model="gpt2", tokenizer__ggml__pre="mystery-pre", **base))
    with pytest.raises(TokenizerError, match="tokenizer.ggml.merges"):
        build_tokenizer_files(_Reader(tokenizer__ggml__model="gpt2", tokenizer__ggml__pre="gpt2",
                                      tokenizer__ggml__tokens=["a"]))


def test_every_known_pre_builds_and_bos_flag_is_honoured():
    """Each `pre` in the table compiles; add_bos_token puts BOS first only with add_special_tokens."""
    from dllm.weights.gguf_tokenizer import _PRE_SPLITS, build_tokenizer_files

    tokens = ["<s>", "1", "2", "3", "12", "123", "h", "i", "hi"]
    for pre in _PRE_SPLITS:
        files = build_tokenizer_files(_Reader(
            tokenizer__ggml__model="gpt2", tokenizer__ggml__pre=pre, tokenizer__ggml__tokens=tokens,
            tokenizer__ggml__token_type=[3] + [1] * 8, tokenizer__ggml__merges=["1 2", "12 3", "h i"],
            tokenizer__ggml__bos_token_id=0, tokenizer__ggml__add_bos_token=True))
        tok = Tokenizer.from_files(files)
        assert json.loads(files["tokenizer_config.json"])["bos_token"] == "<s>"
        assert tok.encode("hi", add_special_tokens=True) == [0, 8]
        assert tok.encode("hi") == [8]
        digits = tok.encode("123")
        assert digits == ([5] if pre in ("gpt2", "llama-bpe", "llama3", "smaug-bpe", "falcon3") else [1, 2, 3]), pre
