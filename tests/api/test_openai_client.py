"""The official openai client, unchanged, against the server on a real socket: sync and async,
streaming and not. Greedy answers equal the engine's own generate_all on the same template."""
import asyncio

import pytest

from tests.api.conftest import MODEL, solo_greedy, text_of, wait_idle

openai = pytest.importorskip("openai", reason="pip install openai (test extra)")

QUESTION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"}]
N = 16


@pytest.fixture(scope="module")
def reference(worker, tokenizer):
    ids = tokenizer.encode_chat(QUESTION)
    out = solo_greedy(worker, ids, N)
    return {"ids": ids, "out": out, "text": text_of(tokenizer, out),
            "finish": "stop" if out[-1] in tokenizer.eos_token_ids else "length"}


def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client(server).models.retrieve(MODEL).id == MODEL


def test_sync_non_stream_equals_generate_all(server, reference):
    r = client(server).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=N, temperature=0)
    assert r.choices[0].message.content == reference["text"]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == reference["finish"]
    assert r.usage.prompt_tokens == len(reference["ids"])
    assert r.usage.completion_tokens == len(reference["out"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_sync_stream_with_usage(server, reference):
    chunks = list(client(server).chat.completions.create(
        model=MODEL, messages=QUESTION, max_completion_tokens=N, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reference["finish"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(reference["out"])
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed


def test_async_stream_and_non_stream(server, reference):
    async def main():
        c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        whole = await c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=N, temperature=0)
        stream = await c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=N, temperature=0, stream=True)
        parts = [ch.choices[0].delta.content or "" async for ch in stream if ch.choices]
        await c.close()
        return whole.choices[0].message.content, "".join(parts)
    whole, streamed = asyncio.run(main())
    assert whole == streamed == reference["text"]


def test_stop_string_is_cut_and_not_emitted(server, reference):
    text = reference["text"]
    assert len(text) > 8
    stop = text[4:7]  # a stop string inside the greedy answer
    cut = text[: text.find(stop)]
    r = client(server).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=N, temperature=0, stop=[stop])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    chunks = client(server).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=N, temperature=0,
                                                    stop=stop, stream=True)
    parts = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in chunks if c.choices]
    assert "".join(p for p, _ in parts) == cut and parts[-1][1] == "stop"
    assert wait_idle(worker_of(server))["idle"]  # the stopped sequence was aborted, its KV freed


def worker_of(server):
    from dllm.api.server import STATE

    return server.runner.app[STATE].worker


def test_completions_endpoint(server, worker, tokenizer):
    prompt = "The three primary colors are"
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    want = text_of(tokenizer, solo_greedy(worker, ids, 8))
    r = client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert r.choices[0].text == want and r.usage.prompt_tokens == len(ids)
    parts = [c.choices[0].text for c in client(server).completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True) if c.choices]
    assert "".join(parts) == want


def test_seeded_sampling_is_reproducible(server):
    kw = dict(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0.9, top_p=0.9, seed=1234)
    a = client(server).chat.completions.create(**kw).choices[0].message.content
    b = client(server).chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_client_errors_map_to_openai_exceptions(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=QUESTION, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=QUESTION, tools=[{"type": "function", "function": {"name": "f"}}])
    assert e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10 ** 6)
    assert e.value.body["code"] == "context_length_exceeded"


def test_rate_limit_429_with_retry_after(make_server):
    from dllm.api.ratelimit import RateLimiter

    s = make_server(rate_limit=RateLimiter(rate=1 / 60, burst=1))
    c = client(s)
    c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1)
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
    assert e.value.body["code"] == "rate_limit_exceeded"
    assert c.models.list().data  # only generation spends the bucket
