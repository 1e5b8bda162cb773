"""Text <-> token ids for a model dir: encode/decode, chat templates, streaming detokenization, stops.

The files are HF's own (tokenizer.json + tokenizer_config.json; for GGUF sources they are written by
dllm.weights.gguf_tokenizer), so the HF `tokenizers` library runs the BPE itself. Chat templates
are rendered the way transformers renders them (same jinja2 environment and globals), so a prompt
built here tokenizes to exactly what the model saw in training.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from dllm.errors import DllmError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


class TokenizerError(DllmError):
    """A tokenizer is missing or unsupported, or was given invalid input (e.g. bad chat messages)."""


class Tokenizer:
    """One model's tokenizer: wraps a `tokenizers.Tokenizer` plus its tokenizer_config.json."""

    def __init__(self, tok: _HFTokenizer, config: dict):
        self._tok = tok
        self.config = config
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.chat_template: str | None = _default_template(config.get("chat_template"))
        self._template = None
        self.eos_token_ids: set[int] = self._find_eos_ids()

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        d = Path(model_dir)
        for name in (TOKENIZER_FILE, CONFIG_FILE):
            if not (d / name).is_file():
                raise TokenizerError(f"{d / name} not found: the model dir has no tokenizer")
        return cls.from_files({n: (d / n).read_text(encoding="utf-8") for n in (TOKENIZER_FILE, CONFIG_FILE)})

    @classmethod
    def from_files(cls, files: dict[str, str]) -> "Tokenizer":
        """From file name -> text, as dllm.weights.gguf_tokenizer.build_tokenizer_files returns."""
        try:
            tok = _HFTokenizer.from_str(files[TOKENIZER_FILE])
            config = json.loads(files.get(CONFIG_FILE, "{}"))
        except Exception as e:  # KeyError, JSONDecodeError, or tokenizers' plain Exception on a bad file
            raise TokenizerError(f"cannot load tokenizer: {e}") from e
        return cls(tok, config)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows, added tokens included (may be < the model's embedding rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Special-token texts inside `text` (e.g. "<|im_start|>") become their ids, as in HF."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        _check_messages(messages)
        if self.chat_template is None:
            raise TokenizerError("this model's tokenizer_config.json has no chat_template")
        if self._template is None:
            self._template = _compile(self.chat_template)
        specials = {k: _token_text(self.config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        try:
            return self._template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                         **{k: v for k, v in specials.items() if v is not None})
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template rejected the messages: {e}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        # The template writes BOS itself where a model wants one, so no post-processor specials (as HF).
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools))

    def _find_eos_ids(self) -> set[int]:
        """EOS, the GGUF's end-of-generation tokens, and the chat template's turn terminator."""
        names = [self.eos_token, *self.config.get("dllm_eog_tokens", []), self._turn_terminator()]
        return {i for i in (self._tok.token_to_id(n) for n in names if n) if i is not None}

    def _turn_terminator(self) -> str | None:
        """The special token the template writes right after an assistant reply, e.g. <|im_end|>.

        Found by rendering a probe conversation rather than by name, so any template works; a
        template that rejects the probe simply contributes nothing.
        """
        if self.chat_template is None:
            return None
        sentinel = "\x00dllm-probe\x00"
        try:
            text = self.apply_chat_template([{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": sentinel}], add_generation_prompt=False)
        except TokenizerError:
            return None
        if sentinel not in text:
            return None
        tail = text.split(sentinel, 1)[1]
        specials = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        return next((s for s in sorted(specials, key=len, reverse=True) if tail.startswith(s)), None)


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _default_template(value) -> str | None:
    """Older tokenizer_config.json files hold a list of named templates; chat uses "default"."""
    if isinstance(value, list):
        return next((t["template"] for t in value if t.get("name") == "default"), None)
    return value


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("chat messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise TokenizerError(f"chat message {i} must be a dict with a string 'role'")
        if not isinstance(m.get("content"), str):
            raise TokenizerError(f"chat message {i} ({m['role']}) has non-string content: "
                                 f"{type(m.get('content')).__name__}")


def _compile(template: str) -> jinja2.Template:
    """transformers' chat-template environment: sandboxed, trim/lstrip blocks, its tojson and globals."""
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes '<' '>' '&', which would change the prompt text.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template does not parse: {e}") from e


class StreamDecoder:
    """Token ids in, text deltas out; the deltas concatenate to decode(all ids).

    Keeps a small window [prefix, read) of already-emitted ids as left context and decodes
    window + new ids. A delta is emitted only when the decoded text does not end in U+FFFD, i.e. the
    bytes end on a complete UTF-8 character, so half a character is never emitted. Once bytes end on
    a complete character, later bytes cannot change the text before it, which makes the deltas exact.
    Each step costs a decode of a few tokens, not of the whole sequence.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: context only, already emitted
        self._read = 0    # everything before this is emitted

    def feed(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prev, text = self._window_texts()
        if len(text) > len(prev) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(prev):]
        return ""

    def flush(self) -> str:
        """The held-back tail (e.g. a dangling partial character, decoded as U+FFFD) at stream end."""
        prev, text = self._window_texts()
        self._prefix = self._read = len(self._ids)
        return text[len(prev):]

    def _window_texts(self) -> tuple[str, str]:
        window = self._ids[self._prefix:]
        return (self._tok.decode(window[: self._read - self._prefix], self._skip),
                self._tok.decode(window, self._skip))


class StopChecker:
    """Cuts a text stream at the first stop string; the stop string itself is never emitted.

    feed(delta) -> (text safe to emit, stopped). A suffix that could still grow into a stop string
    is held back until it can't. "First" = the stop occurrence that ends earliest (ties: the one
    starting earliest), which is what a character-by-character stream would hit first, so the
    result does not depend on how the text was chunked.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]  # "" would stop before any text: treat as no stop
        self._buf = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self._buf += delta
        hit = self._first_stop()
        if hit is not None:
            out, self._buf, self.stopped = self._buf[:hit], "", True
            return out, True
        keep = self._held_suffix_len()
        out, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        return out, False

    def flush(self) -> str:
        """Text held back at stream end (it never became a stop)."""
        out, self._buf = self._buf, ""
        return "" if self.stopped else out

    def _first_stop(self) -> int | None:
        best = None  # (end, start)
        for s in self.stops:
            i = self._buf.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best):
                best = (i + len(s), i)
        return None if best is None else best[1]

    def _held_suffix_len(self) -> int:
        """Longest suffix of the buffer that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self._buf)), best, -1):
                if self._buf.endswith(s[:n]):
                    best = n
                    break
        return best
