"""Token stream -> text deltas: detokenize incrementally, cut at stop strings, count usage.

A stop string can span tokens, so it is found on text (StopChecker), never on ids; the stop text
is not emitted and the sequence is aborted at once so its KV is freed. EOS tokens end the stream
without adding text.
"""
from __future__ import annotations

from typing import AsyncIterator

from dllm.api.worker import TokenStream
from dllm.tokenizer import StopChecker, StreamDecoder, Tokenizer


class TextStream:
    def __init__(self, stream: TokenStream, tokenizer: Tokenizer, stops: list[str], eos_ids: frozenset[int]):
        self.stream = stream
        self.eos_ids = eos_ids
        self.decoder = StreamDecoder(tokenizer)
        self.stops = StopChecker(stops)
        self.prompt_tokens = len(stream.prompt)
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def deltas(self) -> AsyncIterator[str]:
        """Text pieces as they come; sets ``finish_reason`` ("stop" | "length") when done."""
        try:
            async for token in self.stream:
                self.completion_tokens += 1
                if token in self.eos_ids and not self.stream.params.ignore_eos:
                    continue
                text, stopped = self.stops.feed(self.decoder.feed(token))
                if text:
                    yield text
                if stopped:
                    self.finish_reason = "stop"
                    return
            text, stopped = self.stops.feed(self.decoder.flush())
            text += self.stops.flush()
            if text:
                yield text
            self.finish_reason = "stop" if stopped else self.stream.finish_reason
        finally:
            self.stream.cancel()  # no-op once finished; frees the KV after a stop or a disconnect

    async def text(self) -> str:
        return "".join([d async for d in self.deltas()])
