"""Request validation alone: every refusal is a 400 naming its param; neutral values pass."""
import pytest

from dllm.api.errors import ApiError
from dllm.api.schemas import parse_body, parse_chat, parse_completion

MSG = [{"role": "user", "content": "hi"}]


def chat(**kw):
    return parse_chat({"model": "m", "messages": MSG, **kw})


def refused(fn, *args, **kw) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*args, **kw)
    assert e.value.status == 400 and e.value.type == "invalid_request_error"
    return e.value


def test_minimal_chat_defaults():
    r = chat()
    assert r.messages == MSG and r.max_tokens is None and r.temperature == 1.0 and r.stop == []
    assert not r.stream and not r.include_usage


def test_full_chat():
    r = chat(max_tokens=5, max_completion_tokens=7, temperature=0, top_p=0.5, seed=3, stop="x", stream=True,
             stream_options={"include_usage": True}, n=1, logprobs=False, tools=[], user="u", top_k=4)
    assert (r.max_tokens, r.temperature, r.top_p, r.seed, r.stop, r.stream, r.include_usage, r.top_k) == \
        (7, 0.0, 0.5, 3, ["x"], True, True, 4)


def test_message_forms():
    r = chat(messages=[{"role": "developer", "content": "be brief"},
                       {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"}])
    assert r.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]


@pytest.mark.parametrize("kw,param", [
    ({"n": 2}, "n"), ({"tools": [{"type": "function"}]}, "tools"), ({"logprobs": True}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"frobnicate": 1}, "frobnicate"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 10 ** 40}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": -1}, "temperature"), ({"temperature": 2.5}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.01}, "top_p"),
    ({"seed": 1 << 64}, "seed"), ({"seed": 1.0}, "seed"), ({"stop": 3}, "stop"), ({"stop": ["a"] * 5}, "stop"),
    ({"stop": [None]}, "stop"), ({"stream": "yes"}, "stream"), ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"x": 1}}, "stream_options"), ({"stream": True, "stream_options": []}, "stream_options"),
    ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"), ({"messages": [1]}, "messages[0]"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ({"model": 5}, "model"), ({"model": None}, "model"), ({"n": True}, "n"),
])
def test_chat_refusals_name_the_param(kw, param):
    assert refused(chat, **kw).param == param


def test_completion():
    r = parse_completion({"model": "m", "prompt": "once"})
    assert r.prompt == "once" and r.max_tokens == 16  # OpenAI's completions default
    assert parse_completion({"model": "m", "prompt": [[1, 2]]}).prompt == [1, 2]
    assert parse_completion({"model": "m", "prompt": ["x"], "echo": False, "best_of": 1}).prompt == "x"


@pytest.mark.parametrize("prompt", ["", [], ["a", "b"], [[1], [2]], [1, "a"], 5, {"a": 1}, [True]])
def test_completion_prompt_refusals(prompt):
    assert refused(parse_completion, {"model": "m", "prompt": prompt}).param == "prompt"


def test_completion_refuses_chat_fields():
    assert refused(parse_completion, {"model": "m", "prompt": "x", "messages": MSG}).param == "messages"
    assert refused(parse_completion, {"model": "m", "prompt": "x", "echo": True}).param == "echo"


@pytest.mark.parametrize("body", [b"", b"  ", b"{", b"[1]", b'"x"', b"null", b'{"a": NaN}', b'{"a": Infinity}',
                                  b"\xff\xfe{}", b'{"model": "\xc3"}', b"[" * 100_000 + b"]" * 100_000,
                                  b"\xef\xbb\xbf{}"])
def test_body_refusals(body):
    refused(parse_body, body)


def test_body_ok():
    assert parse_body('{"model": "ü"}'.encode()) == {"model": "ü"}


def test_long_stop_refused():
    assert refused(chat, stop="x" * 513).param == "stop"
    assert chat(stop="x" * 512).stop == ["x" * 512]
