"""Continuous batching through the API: 50 concurrent streams each equal their solo greedy output,
and clients that disconnect (streaming or not) get their sequences aborted and KV freed."""
import asyncio
import json
import time

import aiohttp
import pytest

from tests.api.conftest import MODEL, engine_call, solo_greedy, text_of, wait_idle

N_STREAMS = 50
N_PROMPTS = 25  # each prompt runs twice in the batch; halves the solo references' cost (~0.7 s each)
MAX_TOKENS = 10
TOPICS = ["cats", "rain", "bread", "chess", "rivers", "the moon", "copper", "bees", "glass", "maps"]


def messages(i: int) -> list[dict]:
    i %= N_PROMPTS
    return [{"role": "user", "content": f"In one sentence, tell me fact number {i // len(TOPICS) + 1} about {TOPICS[i % len(TOPICS)]}."}]


async def stream_chat(session, url, msgs, max_tokens) -> tuple[str, str, dict]:
    body = {"model": MODEL, "messages": msgs, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    text, finish, usage = [], None, None
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for line in r.content:
            line = line.decode().strip()
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                text.append(chunk["choices"][0]["delta"].get("content", ""))
                finish = chunk["choices"][0]["finish_reason"] or finish
            if chunk.get("usage"):
                usage = chunk["usage"]
    return "".join(text), finish, usage


def test_50_concurrent_streams_equal_solo(server, worker, tokenizer):
    prompts = [tokenizer.encode_chat(messages(i)) for i in range(N_PROMPTS)]
    solo = [solo_greedy(worker, ids, MAX_TOKENS) for ids in prompts]
    prompts, solo = prompts * (N_STREAMS // N_PROMPTS), solo * (N_STREAMS // N_PROMPTS)
    steps_before = worker.steps

    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
            return await asyncio.gather(*(stream_chat(s, server.url, messages(i), MAX_TOKENS) for i in range(N_STREAMS)))
    t0 = time.perf_counter()
    results = asyncio.run(main())
    elapsed = time.perf_counter() - t0
    for i, ((text, finish, usage), want) in enumerate(zip(results, solo)):
        assert text == text_of(tokenizer, want), f"stream {i}"
        assert usage["completion_tokens"] == len(want) and usage["prompt_tokens"] == len(prompts[i])
        assert finish == ("stop" if want[-1] in tokenizer.eos_token_ids else "length")
    # batched: far fewer passes than one per token per stream (50 x 10 = 500 one by one); the slack
    # covers requests that straggle in over several steps on busy cores
    assert worker.steps - steps_before <= N_STREAMS * MAX_TOKENS // 5, (worker.steps - steps_before, elapsed)
    assert wait_idle(worker)["idle"] and not worker._streams  # nothing held once all are done


def test_disconnecting_clients_free_their_kv(server, worker, tokenizer):
    """Streaming clients that leave after 2 chunks and non-streaming ones that time out."""
    long = [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}]
    body = {"model": MODEL, "messages": long, "max_tokens": 1500, "temperature": 0, "ignore_eos": True}

    async def leave_streaming(session):
        async with session.post(f"{server.url}/v1/chat/completions", json=dict(body, stream=True)) as r:
            assert r.status == 200
            n = 0
            async for line in r.content:
                n += line.startswith(b"data: ")
                if n >= 3:
                    return  # leaving the block closes the connection mid-stream

    async def leave_waiting(session):
        with pytest.raises(asyncio.TimeoutError):
            async with session.post(f"{server.url}/v1/chat/completions", json=body,
                                    timeout=aiohttp.ClientTimeout(total=1.5)) as r:
                await r.read()

    async def main():
        # force_close: each request on its own connection, so leaving really closes the socket
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            await asyncio.gather(*[leave_streaming(s) for _ in range(4)], *[leave_waiting(s) for _ in range(3)])
    tokens_before = worker.tokens_generated
    asyncio.run(main())
    state = wait_idle(worker, timeout=60)
    assert state["idle"], state
    # 7 sequences of 1500 tokens would be 10,500 tokens: the aborts stopped them early
    assert worker.tokens_generated - tokens_before < 7 * 1500 // 3
    assert engine_call(worker, lambda e: e.has_work) is False
