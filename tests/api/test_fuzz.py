"""Fuzz the API with seeded malformed requests: every one gets a 4xx in OpenAI's error schema,
never a 5xx, never a hang. Each case is invalid by construction (a valid base plus at least one
mutation that alone makes it invalid), so a 200 would also be a bug."""
import asyncio
import collections
import json
import random

import aiohttp

from tests.api.conftest import MODEL

SEED = 20240607
N_CASES = 600
MAX_BODY = 16 * 1024
HUGE = [10 ** 30, -(10 ** 30), 2 ** 64, 1e308, -1e308, 10 ** 400]
JUNK = [None, True, False, 0, -1, 1.5, "", "x", [], {}, [1, 2], {"a": 1}, "\u0000", "😀" * 3] + HUGE

CHAT_BAD = {  # field -> values that are each invalid for it
    "model": [5, True, [], {}, "gpt-4", "", "SMOLLM2", "smollm2 "],
    "messages": [None, "hi", [], [1], [None], [{"role": "user"}], [{"role": "tool", "content": "x"}],
                 [{"role": "user", "content": 5}], [{"role": "user", "content": None}], [{"content": "x"}],
                 [{"role": "user", "content": "x", "tool_calls": []}], [{"role": "user", "content": [{"type": "image_url"}]}],
                 [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": "\ud800"}],
                 [{"role": ["user"], "content": "x"}], [{"role": "user", "content": "x", "name": 5}]],
    "max_tokens": [0, -1, 1.5, "16", True, [], {}] + HUGE,
    "max_completion_tokens": [0, -3, "1", 2.0, False] + HUGE,
    "temperature": [-0.1, 2.01, "hot", True, [], {}] + HUGE,
    "top_p": [0, -1, 1.0001, "1", True, []] + HUGE,
    "top_k": [-1, 1.5, "5", True] + HUGE,
    "seed": [1.5, "7", True, [], 2 ** 64, -(2 ** 63) - 1, 10 ** 400],
    "stop": [5, True, [1], [None], ["a", "b", "c", "d", "e"], {"a": 1}, ["\ud800"]],
    "stream": ["yes", 1, 0, [], {}],
    "stream_options": ["x", 1, [], {"include_usage": True}, {"bogus": 1}],  # stream is false in the base
    "ignore_eos": ["yes", 1],
    "n": [0, 2, 10 ** 30, "1", True, 1.5],
    "logprobs": [True, 1, "yes"],
    "tools": [[{"type": "function", "function": {"name": "f"}}], "x", 1],
    "presence_penalty": [0.5, -2, "x"],
    "response_format": [{"type": "json_object"}, "json"],
    "user": [5, [], {}, True],
}
COMPLETION_BAD = {
    "model": [5, "nope", []],
    "prompt": [None, "", 5, [], [[]], ["a", "b"], [[1], [2]], [1, "x"], [-1], [10 ** 9], [True], {"a": 1}, "\udfff", 1.5],
    "max_tokens": [0, -1, "16", 1.5] + HUGE,
    "echo": [True, "yes"], "best_of": [2, "x"], "suffix": ["tail"], "logprobs": [0, 5],
    "temperature": [-1, "x"] + HUGE, "messages": [[{"role": "user", "content": "x"}]],
}


def valid_chat(rng):
    return {"model": MODEL, "messages": [{"role": "user", "content": rng.choice(["hi", "hello", "¿qué?"])}], "max_tokens": 2}


def valid_completion(rng):
    return {"model": MODEL, "prompt": rng.choice(["Once", "The sky"]), "max_tokens": 2}


def mutate_fields(rng, base, bad):
    body = dict(base)
    for field in rng.sample(sorted(bad), rng.randint(1, 3)):
        body[field] = rng.choice(bad[field])
    if rng.random() < 0.3:  # extra noise: unknown fields are invalid on their own
        body["x_" + "".join(rng.choice("abcxyz_") for _ in range(rng.randint(1, 12)))] = rng.choice(JUNK)
    return json.dumps(body).encode()


def broken_json(rng, base):
    text = json.dumps(base)
    kind = rng.randrange(8)
    if kind == 0:
        return text[: rng.randrange(len(text) - 1)].encode()  # truncated
    if kind == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))  # noise (never valid JSON objects)
    if kind == 2:
        return b"[" * rng.randint(1000, 200_000)
    if kind == 3:
        return text.replace('"max_tokens": 2', rng.choice(['"max_tokens": NaN', '"max_tokens": Infinity',
                                                           '"max_tokens": -Infinity'])).encode()
    if kind == 4:
        return rng.choice([b"", b" ", b"null", b"[]", b"1", b'"text"', b"true", b"{}"])
    if kind == 5:
        return text.replace("}", ",}", 1).encode()  # trailing comma
    if kind == 6:
        return (text[:-1] + ', "model": }').encode()
    return b"\xef\xbb\xbf" + text.encode()  # a BOM is not JSON


def bad_utf8(rng, base):
    raw = json.dumps(base, ensure_ascii=False).encode()
    i = raw.index(b'"', raw.index(b'"content"' if b'"content"' in raw else b'"prompt"') + 10) + 1
    junk = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf", b"\x80\x80"])
    return raw[:i] + junk + raw[i:]


def make_case(rng):
    """(method, path, body bytes or None, headers, chunked)."""
    chat = rng.random() < 0.7
    path = "/v1/chat/completions" if chat else "/v1/completions"
    base = (valid_chat if chat else valid_completion)(rng)
    kind = rng.random()
    if kind < 0.45:
        return "POST", path, mutate_fields(rng, base, CHAT_BAD if chat else COMPLETION_BAD), {}, False
    if kind < 0.7:
        return "POST", path, broken_json(rng, base), {}, False
    if kind < 0.82:
        return "POST", path, bad_utf8(rng, base), {}, False
    if kind < 0.92:
        pad = "x" * rng.randint(MAX_BODY, 4 * MAX_BODY)
        body = dict(base, **({"messages": [{"role": "user", "content": pad}]} if chat else {"prompt": pad}))
        return "POST", path, json.dumps(body).encode(), {}, rng.random() < 0.5
    method, route = rng.choice([("GET", path), ("PUT", path), ("DELETE", "/v1/models"), ("POST", "/v1/models"),
                                ("POST", "/v1/chat"), ("GET", "/v1/" + "a" * rng.randint(1, 300)),
                                ("POST", "/v1/embeddings"), ("PATCH", "/health"), ("POST", "/metrics")])
    return method, route, json.dumps(base).encode(), {}, False


async def send(session, url, case):
    method, path, body, headers, chunked = case
    data = body
    if chunked:  # no Content-Length: the limit must hold while reading
        async def gen():
            for i in range(0, len(body), 4096):
                yield body[i:i + 4096]
        data = gen()
    headers = {"Content-Type": "application/json", **headers}
    try:
        async with session.request(method, url + path, data=data, headers=headers) as r:
            return r.status, await r.read()
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as e:
        return "disconnected", repr(e).encode()  # counted and asserted to be zero


def test_fuzz_is_always_4xx_with_error_schema(make_server):
    server = make_server(max_body_bytes=MAX_BODY)
    rng = random.Random(SEED)
    cases = [make_case(rng) for _ in range(N_CASES)]

    async def main():
        sem = asyncio.Semaphore(16)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            async def one(case):
                async with sem:
                    return await send(s, server.url, case)
            return await asyncio.gather(*(one(c) for c in cases))
    results = asyncio.run(main())
    failures = []
    for case, (status, raw) in zip(cases, results):
        ok = isinstance(status, int) and 400 <= status < 500
        if ok:
            try:
                err = json.loads(raw)["error"]
                ok = set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
            except (ValueError, KeyError, TypeError):
                ok = False
        if not ok:
            failures.append((status, case[0], case[1], case[2][:120], raw[:200]))
    assert not failures, f"{len(failures)} of {N_CASES} bad answers, first: {failures[:5]}"
    statuses = collections.Counter(s for s, _ in results)
    assert {400, 404, 405, 413} <= set(statuses), statuses
    assert statuses["disconnected"] == 0, statuses
