"""GGUF tokenizer metadata -> HF `tokenizer.json` + `tokenizer_config.json` texts.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges, token types and special
ids as `tokenizer.ggml.*` metadata, plus a `pre` name that selects a hard-coded split regex in
llama-vocab.cpp. We rebuild the equivalent HF `tokenizers` pipeline so dllm.tokenizer can load a
converted model dir exactly like an HF checkpoint.

Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is supported; SentencePiece (`llama`) and
unknown `pre` names raise TokenizerError naming what was found.
"""
from __future__ import annotations

import json
from functools import lru_cache

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from dllm.tokenizer import TokenizerError


# llama.cpp token types (llama_token_type in llama.h).
_CONTROL, _USER_DEFINED = 3, 4

# Split regexes per llama.cpp `tokenizer.ggml.pre`, written as the tokenizer.json of the source model
# does. None = GPT-2's own regex, which ByteLevel(use_regex=True) applies.
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS = r"\p{N}"  # llama.cpp runs "\p{N}" (one digit per piece) before GPT-2's regex
_PRE_SPLITS: dict[str, tuple[str | None, bool]] = {
    # name: (regex applied first, whether ByteLevel then applies GPT-2's regex)
    "gpt2": (None, True),
    "smollm": (_DIGITS, True),
    "starcoder": (_DIGITS, True),
    "refact": (_DIGITS, True),
    "codeshell": (_DIGITS, True),
    "qwen2": (_QWEN2, False),
    "deepseek-r1-qwen": (_QWEN2, False),
    "stablelm2": (_QWEN2, False),
    "llama-bpe": (_LLAMA3, False),
    "llama3": (_LLAMA3, False),
    "smaug-bpe": (_LLAMA3, False),
    "falcon3": (_LLAMA3, False),
}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char map: byte-level vocab entries are spelled in these chars.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, ...) map to U+0100+
    so no token contains whitespace or unprintables (space -> 'Ġ', newline -> 'Ċ').
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def build_tokenizer_files(reader) -> dict[str, str]:
    """{"tokenizer.json": ..., "tokenizer_config.json": ...} for the tokenizer a GGUFReader describes."""
    meta = _Meta(reader)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(
            f"GGUF tokenizer model {kind!r} is not supported: dllm rebuilds only byte-level BPE ('gpt2') "
            "tokenizers (SentencePiece 'llama' vocabularies are not supported yet)")
    tokens = meta.require("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tok = _byte_level_bpe(tokens, types, meta.require("tokenizer.ggml.merges"))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    config = _tokenizer_config(meta, tokens)
    tok.post_processor = _post_processor(config, tokens, meta)
    return {
        "tokenizer.json": tok.to_str(pretty=False),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
    }


class _Meta:
    """Typed reads of GGUF key/values; a missing required key fails by name."""

    def __init__(self, reader):
        self.fields = reader.fields

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise TokenizerError(f"GGUF has no {key!r}: cannot build its tokenizer")
        return value

    def arch_value(self, suffix: str):
        arch = self.get("general.architecture")
        return None if arch is None else self.get(f"{arch}.{suffix}")


def _byte_level_bpe(tokens: list[str], types: list[int], merges: list[str]) -> Tokenizer:
    """BPE over the byte alphabet; control / user-defined entries also become added tokens.

    Normal entries are already spelled in the byte alphabet. Control and user-defined entries are
    stored as raw text (llama.cpp matches them verbatim), so those keep their raw spelling as the
    vocab key: added tokens resolve their id through the vocab, and the ByteLevel decoder passes
    chars outside its alphabet through as UTF-8.
    """
    alphabet = set(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    added: dict[int, list[AddedToken]] = {_CONTROL: [], _USER_DEFINED: []}
    for i, (text, ttype) in enumerate(zip(tokens, types)):
        if ttype in added:
            added[ttype].append(AddedToken(text, special=ttype == _CONTROL, normalized=False))
        elif not set(text) <= alphabet:
            text = "".join(bytes_to_unicode()[b] for b in text.encode("utf-8"))
        vocab.setdefault(text, i)
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"GGUF merge {m!r} is not two space-separated tokens")
        pairs.append((parts[0], parts[1]))
    tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    # Ids come from the vocab, so nothing is appended past len(tokens). Control tokens are special
    # (decode(skip_special_tokens) drops them); user-defined ones, like Qwen's <tool_call>, are
    # matched whole but are ordinary output text, as in that model's own tokenizer.json.
    tok.add_special_tokens(added[_CONTROL])
    tok.add_tokens(added[_USER_DEFINED])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise TokenizerError(
            f"rebuilt vocab has {tok.get_vocab_size(with_added_tokens=True)} entries, GGUF lists {len(tokens)} "
            "(duplicate token texts?)")
    return tok


def _pre_tokenizer(pre: str | None):
    if pre not in _PRE_SPLITS:
        raise TokenizerError(
            f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; known: {sorted(_PRE_SPLITS)}")
    regex, gpt2_regex = _PRE_SPLITS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_regex)
    if regex is None:
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"), byte_level])


def _tokenizer_config(meta: _Meta, tokens: list[str]) -> dict:
    """tokenizer_config.json: special token texts, BOS/EOS flags, template, context length."""
    def text_of(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        if (text := text_of(key)) is not None:
            config[name] = text
    # GGUF-only end-of-generation ids (Llama 3's <|eot_id|>, <|eom_id|>); not an HF key, so namespaced.
    eog = [t for t in (text_of("eot_token_id"), text_of("eom_token_id")) if t is not None]
    if eog:
        config["dllm_eog_tokens"] = eog
    # llama.cpp adds no BOS to a byte-level vocab unless the file says so.
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if (ctx := meta.arch_value("context_length")) is not None:
        config["model_max_length"] = int(ctx)
    if (template := meta.get("tokenizer.chat_template")) is not None:
        config["chat_template"] = template
    return config


def _post_processor(config: dict, tokens: list[str], meta: _Meta):
    """Prepend BOS / append EOS on encode(add_special_tokens=True) only where the GGUF asks to."""
    single, specials = ["$A"], []
    for flag, name, key, at_end in (("add_bos_token", "bos_token", "bos_token_id", False),
                                    ("add_eos_token", "eos_token", "eos_token_id", True)):
        if config[flag]:
            if name not in config:
                raise TokenizerError(f"GGUF sets tokenizer.ggml.{flag} but has no {key}")
            single = single + [config[name]] if at_end else [config[name]] + single
            specials.append((config[name], meta.get(f"tokenizer.ggml.{key}")))
    return processors.TemplateProcessing(single=single, pair=single + ["$B"], special_tokens=specials)
