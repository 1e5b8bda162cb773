"""Request bodies -> checked ``GenRequest``s. Every refusal is an ApiError 400 naming its param.

Nothing is ignored silently: a field we do not know is refused, and a known OpenAI field we do
not implement (n, tools, logprobs, penalties, ...) is accepted only at its neutral value (null,
n=1, logprobs=false, ...), so a client never gets an answer to a different question than it asked.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from dllm.api.errors import invalid

MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 512  # StopChecker's held-suffix scan is quadratic in a stop's length: keep it short
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# Fields both endpoints take; the unsupported ones map to the values that mean "off".
# top_k and ignore_eos are extensions (as in vLLM); the rest is OpenAI's.
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options", "user",
          "ignore_eos"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = COMMON | {"prompt"}
_OFF = object()  # placeholder: only null is neutral
CHAT_NEUTRAL = {"n": 1, "logprobs": False, "top_logprobs": 0, "presence_penalty": 0, "frequency_penalty": 0,
                "tools": [], "tool_choice": "none", "parallel_tool_calls": _OFF, "functions": [],
                "function_call": "none", "response_format": {"type": "text"}, "logit_bias": {}}
COMPLETION_NEUTRAL = {"n": 1, "best_of": 1, "echo": False, "logprobs": _OFF, "suffix": _OFF,
                      "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}
WHY = {"n": "n > 1 is not supported: this server returns one choice per request",
       "best_of": "best_of > 1 is not supported: this server returns one choice per request",
       "tools": "tools (function calling) are not supported by this server",
       "functions": "functions (function calling) are not supported by this server"}


@dataclass
class GenRequest:
    model: str
    messages: list[dict] | None = None  # chat
    prompt: str | list[int] | None = None  # completions: text or token ids
    max_tokens: int | None = None  # None: as many as fit
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


def parse_body(body: bytes) -> dict:
    """Raw bytes -> a JSON object; bad UTF-8, bad JSON, NaN/Infinity and non-objects are 400."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid(f"request body is not valid UTF-8 (bad byte at offset {e.start})") from None
    if not text.strip():
        raise invalid("request body is empty: expected a JSON object")
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise invalid("request body JSON is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError and our NaN refusal
        raise invalid(f"request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise invalid(f"request body must be a JSON object, got {_json_type(obj)}")
    return obj


def parse_chat(body: dict) -> GenRequest:
    _check_fields(body, CHAT_FIELDS, CHAT_NEUTRAL)
    req = _common(body)
    req.messages = _messages(_required(body, "messages"))
    mct = _opt_int(body, "max_completion_tokens", 1)
    if mct is not None:
        req.max_tokens = mct
    return req


def parse_completion(body: dict) -> GenRequest:
    _check_fields(body, COMPLETION_FIELDS, COMPLETION_NEUTRAL)
    req = _common(body)
    req.prompt = _prompt(_required(body, "prompt"))
    if "max_tokens" not in body or body["max_tokens"] is None:
        req.max_tokens = 16  # OpenAI's default for /v1/completions
    return req


# ---- the pieces -------------------------------------------------------------------------------
def _check_fields(body: dict, allowed: set[str], neutral: dict) -> None:
    for name in body:
        if name in allowed:
            continue
        if name not in neutral:
            raise invalid(f"Unrecognized request argument supplied: {_clip(name)}", param=_clip(name),
                          code="unknown_parameter")
        value = body[name]
        if value is None or (neutral[name] is not _OFF and _same(value, neutral[name])):
            continue
        raise invalid(WHY.get(name, f"'{name}' is not supported by this server (only its default/null is accepted)"),
                      param=name, code="unsupported_parameter")


def _common(body: dict) -> GenRequest:
    model = _required(body, "model")
    if not isinstance(model, str):
        raise invalid(f"'model' must be a string, got {_json_type(model)}", param="model")
    _text(model, "model")
    if body.get("user") is not None:
        _text(_want(body, "user", str, "a string"), "user")
    req = GenRequest(model=model)
    req.max_tokens = _opt_int(body, "max_tokens", 1)
    req.temperature = _opt_number(body, "temperature", 0.0, 2.0, 1.0)
    req.top_p = _opt_number(body, "top_p", 0.0, 1.0, 1.0)
    if req.top_p == 0.0:
        raise invalid("'top_p' must be greater than 0", param="top_p")
    req.top_k = _opt_int(body, "top_k", 0) or 0
    req.seed = _opt_int(body, "seed", *SEED_RANGE)
    req.stop = _stop(body.get("stop"))
    req.stream = bool(_opt(body, "stream", bool, "a boolean", False))
    req.ignore_eos = bool(_opt(body, "ignore_eos", bool, "a boolean", False))
    opts = _opt(body, "stream_options", dict, "an object", None)
    if opts is not None:
        if not req.stream:
            raise invalid("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                          param="stream_options")
        extra = set(opts) - {"include_usage"}
        if extra:
            raise invalid(f"Unrecognized stream_options field: {_clip(sorted(extra)[0])}", param="stream_options")
        req.include_usage = bool(_opt(opts, "include_usage", bool, "a boolean", False, "stream_options.include_usage"))
    return req


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty array of {role, content} objects", param="messages")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(value)]


def _message(m, param: str) -> dict:
    if not isinstance(m, dict):
        raise invalid(f"'{param}' must be an object, got {_json_type(m)}", param=param)
    extra = set(m) - {"role", "content", "name"}
    if extra:
        key = _clip(sorted(extra)[0])
        raise invalid(f"'{param}.{key}' is not supported by this server", param=f"{param}.{key}")
    role = m.get("role")
    if role not in ROLES:
        raise invalid(f"'{param}.role' must be one of system, developer, user, assistant; got {_clip(repr(role))}",
                      param=f"{param}.role")
    if m.get("name") is not None:
        _text(_want(m, "name", str, "a string", f"{param}.name"), f"{param}.name")
    return {"role": ROLES[role], "content": _content(m.get("content"), f"{param}.content")}


def _content(value, param: str) -> str:
    """A string, or OpenAI's array of text parts (joined); images and audio are refused."""
    if isinstance(value, str):
        return _text(value, param)
    if not isinstance(value, list):
        raise invalid(f"'{param}' must be a string or an array of text parts, got {_json_type(value)}", param=param)
    parts = []
    for i, p in enumerate(value):
        if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str) or set(p) - {"type", "text"}:
            raise invalid(f"'{param}[{i}]' must be {{\"type\": \"text\", \"text\": string}} (only text is supported)",
                          param=f"{param}[{i}]")
        parts.append(_text(p["text"], f"{param}[{i}].text"))
    return "".join(parts)


def _prompt(value) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # ["text"] or [[ids]]: one prompt
    if isinstance(value, str):
        if not value:
            raise invalid("'prompt' must not be empty", param="prompt")
        return _text(value, "prompt")
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    if isinstance(value, list) and value and all(isinstance(t, (str, list)) for t in value):
        raise invalid("batched prompts are not supported: send one prompt per request", param="prompt")
    raise invalid("'prompt' must be a non-empty string or a non-empty array of token ids", param="prompt")


def _stop(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("'stop' must be a string or an array of strings", param="stop")
    if len(stops) > MAX_STOPS:
        raise invalid(f"'stop' takes at most {MAX_STOPS} sequences, got {len(stops)}", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise invalid(f"each stop sequence may be at most {MAX_STOP_CHARS} characters", param="stop")
    return [_text(s, "stop") for s in stops]


# ---- typed field readers ----------------------------------------------------------------------
def _required(body: dict, name: str):
    if body.get(name) is None:
        raise invalid(f"Missing required parameter: '{name}'", param=name, code="missing_required_parameter")
    return body[name]


def _want(obj: dict, name: str, kind, what: str, param: str | None = None):
    value = obj[name]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise invalid(f"'{param or name}' must be {what}, got {_json_type(value)}", param=param or name)
    return value


def _opt(obj: dict, name: str, kind, what: str, default, param: str | None = None):
    return default if obj.get(name) is None else _want(obj, name, kind, what, param)


def _opt_int(body: dict, name: str, lo: int, hi: int = (1 << 31) - 1) -> int | None:
    value = _opt(body, name, int, "an integer", None)
    if value is not None and not lo <= value <= hi:
        raise invalid(f"'{name}' must be between {lo} and {hi}, got {_clip(str(value))}", param=name)
    return value


def _opt_number(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    value = _opt(body, name, (int, float), "a number", None)
    if value is None:
        return default
    # ints compare exactly (10**400 would overflow math.isfinite); floats must also be finite
    if not (lo <= value <= hi and (isinstance(value, int) or math.isfinite(value))):
        raise invalid(f"'{name}' must be between {lo} and {hi}, got {_clip(str(value))}", param=name)
    return float(value)


def _text(value: str, param: str) -> str:
    """JSON may escape lone surrogates (\\ud800) that are not text: refuse them here, not in the tokenizer."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"'{param}' contains an invalid Unicode surrogate", param=param) from None
    return value


def _same(a, b) -> bool:
    """JSON equality without Python's True == 1 and 0 == False."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _json_type(value) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _clip(text: str, n: int = 64) -> str:
    return text if len(text) <= n else text[:n] + "…"
