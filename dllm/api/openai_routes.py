"""OpenAI-compatible generation routes: /v1/chat/completions and /v1/completions.

One path serves both: read a bounded body, check it (schemas.py), build the prompt ids and
SamplingParams, pass the door (payment gate or per-IP rate limit), queue the request on the
EngineWorker, then answer as one JSON body or as SSE chunks ``data: {...}\\n\\n`` ending in
``data: [DONE]``. Whatever ends the request (finish, stop string, client gone), the sequence is
cancelled in ``finally`` so its KV is freed on every stage.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from aiohttp import web

from dllm.api import errors
from dllm.api.errors import ApiError, invalid
from dllm.api.schemas import GenRequest, parse_body, parse_chat, parse_completion
from dllm.api.state import STATE, AppState
from dllm.api.textgen import TextStream
from dllm.api.worker import Busy, WorkerClosed
from dllm.errors import DllmError, RequestError
from dllm.sampling import SamplingParams
from dllm.tokenizer import TokenizerError


@dataclass(frozen=True)
class Kind:
    """What differs between chat and text completions."""

    chat: bool
    object: str
    chunk_object: str
    id_prefix: str


INLINE_TOKENIZE_CHARS = 16_384  # larger prompts are templated + tokenized off the event loop
CHAT = Kind(True, "chat.completion", "chat.completion.chunk", "chatcmpl-")
TEXT = Kind(False, "text_completion", "text_completion", "cmpl-")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, TEXT)


async def _generate(request: web.Request, kind: Kind) -> web.StreamResponse:
    state = request.app[STATE]
    t0 = time.perf_counter()
    req, ids, params = await _prepare(request, state, kind)
    if not state.worker.has_room:  # before the door, so a payment is not taken for a 503
        raise errors.busy(f"server busy: {state.worker.in_flight} requests in flight; retry shortly")
    door = await state.admit(request)
    if isinstance(door, web.StreamResponse):
        return door
    try:
        stream = state.worker.submit(ids, params)
    except Busy as e:
        raise errors.busy(str(e)) from None
    except WorkerClosed as e:
        raise ApiError(503, str(e), "server_error", None, "shutting_down") from None
    text = TextStream(stream, state.tokenizer, req.stop, state.worker.eos_ids)
    try:
        try:
            await stream.accepted()
        except RequestError as e:
            raise invalid(str(e)) from None
        state.metrics.prompt_tokens.inc(len(ids))
        reply = _sse if req.stream else _whole
        return await reply(request, state, kind, req, text, door)
    finally:
        stream.cancel()
        state.metrics.completion_tokens.inc(text.completion_tokens)
        if stream.first_token_at is not None:
            state.metrics.ttft.observe(stream.first_token_at - t0)
        state.metrics.latency.observe(time.perf_counter() - t0)


async def _prepare(request: web.Request, state: AppState, kind: Kind) -> tuple[GenRequest, list[int], SamplingParams]:
    """Body -> checked request, prompt ids and sampling params; any flaw is a 4xx ApiError."""
    body = parse_body(await _read_body(request, state.max_body_bytes))
    req = parse_chat(body) if kind.chat else parse_completion(body)
    if req.model != state.model_name:
        raise errors.model_not_found(req.model)
    if _text_size(req) > INLINE_TOKENIZE_CHARS:  # keep a big prompt from stalling other streams
        ids = await asyncio.to_thread(_prompt_ids, state, req)
    else:
        ids = _prompt_ids(state, req)
    return req, ids, _sampling(state, req, len(ids), "messages" if kind.chat else "prompt")


async def _read_body(request: web.Request, limit: int) -> bytes:
    """Refuse by Content-Length before reading; aiohttp's client_max_size guards chunked bodies."""
    size = request.content_length
    if size is not None and size > limit:
        raise ApiError(413, f"request body is {size} bytes; the limit is {limit}", code="request_too_large")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large") from None


def _text_size(req: GenRequest) -> int:
    if req.messages is not None:
        return sum(len(m["content"]) for m in req.messages)
    return len(req.prompt) if isinstance(req.prompt, str) else 0


def _prompt_ids(state, req: GenRequest) -> list[int]:
    try:
        if req.messages is not None:
            ids = state.tokenizer.encode_chat(req.messages)
        elif isinstance(req.prompt, str):
            ids = state.tokenizer.encode(req.prompt, add_special_tokens=True)
        else:
            ids = req.prompt
    except TokenizerError as e:
        raise invalid(str(e), param="messages" if req.messages is not None else "prompt") from None
    bad = next((t for t in ids if not 0 <= t < state.vocab_size), None)
    if bad is not None:
        raise invalid(f"token id {bad} is outside the vocabulary [0, {state.vocab_size})", param="prompt")
    if not ids:
        raise invalid("the prompt encodes to zero tokens", param="prompt")
    return ids


def _sampling(state, req: GenRequest, n_prompt: int, prompt_param: str) -> SamplingParams:
    """Fit max_tokens to the context and the KV cache; default to as many as fit (capped)."""
    limit = min(state.worker.context_len, state.worker.kv_tokens)
    room = limit - n_prompt
    if room < 1:
        raise invalid(f"This model's maximum context length is {limit} tokens, and your prompt is {n_prompt} tokens.",
                      param=prompt_param, code="context_length_exceeded")
    max_tokens = req.max_tokens if req.max_tokens is not None else min(state.default_max_tokens, room)
    if max_tokens > room:
        raise invalid(f"This model's maximum context length is {limit} tokens. However, you requested "
                      f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the completion).",
                      param="max_tokens", code="context_length_exceeded")
    try:
        return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                              max_tokens=max_tokens, stop=req.stop, ignore_eos=req.ignore_eos)
    except RequestError as e:
        raise invalid(str(e)) from None


# ---- answers ----------------------------------------------------------------------------------
def _envelope(req: GenRequest, rid: str, obj: str) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": req.model, "system_fingerprint": None}


def _choice(kind: Kind, text: str | None, finish: str | None, whole: bool, first: bool = False) -> dict:
    if not kind.chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    if whole:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
    delta = {} if text is None else {"content": text}
    if first:
        delta = {"role": "assistant", "content": text or ""}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _finish(text: TextStream) -> str:
    return text.finish_reason if text.finish_reason in ("stop", "length") else "stop"


async def _whole(request, state, kind: Kind, req: GenRequest, text: TextStream, headers: dict) -> web.Response:
    parts = []
    async for delta in text.deltas():
        parts.append(delta)
        if request.transport is None or request.transport.is_closing():
            raise ConnectionResetError("client went away")  # finally-blocks abort the sequence
    body = _envelope(req, kind.id_prefix + uuid.uuid4().hex, kind.object)
    body["choices"] = [_choice(kind, "".join(parts), _finish(text), whole=True)]
    body["usage"] = text.usage()
    return web.json_response(body, headers=headers)


async def _sse(request, state, kind: Kind, req: GenRequest, text: TextStream, headers: dict) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
    resp.content_type = "text/event-stream"
    await resp.prepare(request)
    base = _envelope(req, kind.id_prefix + uuid.uuid4().hex, kind.chunk_object)
    if req.include_usage:
        base["usage"] = None

    async def send(choice: dict | None, usage: dict | None = None) -> None:
        chunk = dict(base, choices=[choice] if choice else [])
        if usage is not None:
            chunk["usage"] = usage
        await resp.write(b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n")

    try:
        if kind.chat:
            await send(_choice(kind, "", None, whole=False, first=True))
        async for delta in text.deltas():
            await send(_choice(kind, delta, None, whole=False))
        await send(_choice(kind, None, _finish(text), whole=False))
        if req.include_usage:
            await send(None, text.usage())
    except DllmError as e:  # the engine failed or shut down after the 200 went out
        await resp.write(errors.sse_error(ApiError(503, str(e), "server_error", None, "generation_failed")))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp
