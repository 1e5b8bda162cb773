"""Engine: the generation loop on the coordinator (stage 0).

It owns the embedding, the head, sampling and the first layer range (a StageRunner), and
drives the rest of the model through a ``Pipeline`` — in-process runners or the remote chain,
which look the same from here. Continuous batching: every ``step()`` runs one forward pass
over all running sequences (one token each) plus as much waiting prefill as fits the token
budget, so new requests join between steps.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from dllm.batch import SeqChunk
from dllm.errors import RequestError
from dllm.model.runner import StageRunner
from dllm.sampling import SamplingParams, make_generator, sample


class Pipeline(Protocol):
    """The layers after the coordinator's own: x [T, H] -> [T, H]."""

    def forward(self, x: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor: ...

    def free(self, seq_id: int) -> None: ...


class LocalPipeline:
    """Stages run in this process, one after another (tests, single-machine use)."""

    def __init__(self, runners: list[StageRunner]):
        self.runners = runners

    def forward(self, x: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        for r in self.runners:
            x = r.forward(x, chunks)
        return x

    def free(self, seq_id: int) -> None:
        for r in self.runners:
            r.free(seq_id)


@dataclass
class Sequence:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    output: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose KV is on every stage
    finish_reason: str | None = None  # "stop" | "length" | "abort"

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    def __init__(self, head: StageRunner, pipeline: Pipeline | None = None, eos_ids=(),
                 max_batch_tokens: int = 2048, max_seqs: int = 64):
        self.head = head
        self.model = head.model
        self.pipeline = pipeline
        self.eos_ids = set(eos_ids)
        self.max_batch_tokens = max_batch_tokens
        self.max_seqs = max_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._ids = itertools.count(1)
        self._reserved = 0  # KV blocks promised to admitted sequences (prompt + max_tokens)

    # ---- requests ----------------------------------------------------------------------------
    def _blocks_for(self, seq: Sequence) -> int:
        return self.head.blocks.blocks_needed(len(seq.prompt) + seq.params.max_tokens)

    def add(self, prompt: list[int], params: SamplingParams | None = None) -> Sequence:
        params = params or SamplingParams()
        if not prompt:
            raise RequestError("empty prompt: at least one token is needed")
        limit = self.model.config.max_position_embeddings
        if len(prompt) + params.max_tokens > limit:
            raise RequestError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context of {limit}")
        seq = Sequence(next(self._ids), list(prompt), params, make_generator(params.seed))
        if self._blocks_for(seq) > self.head.blocks.num_blocks:
            raise RequestError(f"prompt + max_tokens = {len(prompt) + params.max_tokens} tokens exceeds the KV cache "
                               f"({self.head.blocks.num_blocks * self.head.block_size} tokens)")
        self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        if not seq.finished:
            seq.finish_reason = "abort"
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self._reserved -= self._blocks_for(seq)
            self.head.free(seq.seq_id)
            if self.pipeline is not None:
                self.pipeline.free(seq.seq_id)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one iteration -------------------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_seqs:
            need = self._blocks_for(self.waiting[0])
            if self._reserved + need > self.head.blocks.num_blocks:
                break
            self._reserved += need
            self.running.append(self.waiting.popleft())

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of its uncached tokens to run) for this pass, within the token budget."""
        budget, plan = self.max_batch_tokens, []
        decoding = [s for s in self.running if len(s.tokens) - s.cached == 1]
        prefilling = [s for s in self.running if len(s.tokens) - s.cached > 1]
        for s in decoding + prefilling:
            n = min(len(s.tokens) - s.cached, budget)
            if n <= 0:
                break
            plan.append((s, n))
            budget -= n
        return plan

    def forward(self, ids: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        """Token ids [T] -> final hidden states [T, H] through every stage."""
        x = self.head.forward(self.model.embed(ids), chunks)
        if self.pipeline is not None:
            x = self.pipeline.forward(x, chunks)
        return x

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Run one pass; return the sequences that got a new token (finished ones included)."""
        self._admit()
        plan = self._schedule()
        if not plan:
            return []
        chunks = [SeqChunk(s.seq_id, s.cached, n) for s, n in plan]
        ids = torch.tensor([t for s, n in plan for t in s.tokens[s.cached:s.cached + n]], device=self.model.device)
        hidden = self.forward(ids, chunks)
        rows, sampled = [], []
        row = 0
        for s, n in plan:
            row += n
            s.cached += n
            if s.cached == len(s.tokens):  # prompt fully in: this row's logits choose the next token
                rows.append(row - 1)
                sampled.append(s)
        if not sampled:
            return []
        logits = self.model.logits(hidden[rows])
        tokens = sample(logits, [s.params for s in sampled], [s.generator for s in sampled]).tolist()
        for s, t in zip(sampled, tokens):
            self._append(s, t)
        return sampled

    def _append(self, s: Sequence, token: int) -> None:
        s.output.append(token)
        if token in self.eos_ids and not s.params.ignore_eos:
            s.finish_reason = "stop"
        elif len(s.output) >= s.params.max_tokens:
            s.finish_reason = "length"
        if s.finished:
            self._release(s)

    # ---- convenience -------------------------------------------------------------------------
    def generate(self, prompt: list[int], params: SamplingParams | None = None) -> Iterator[int]:
        """Tokens of one sequence as they come (other queued sequences advance too)."""
        seq = self.add(prompt, params)
        emitted = 0
        try:
            while not seq.finished:
                self.step()
                while emitted < len(seq.output):
                    emitted += 1
                    yield seq.output[emitted - 1]
        finally:
            if not seq.finished:
                self.abort(seq)

    def generate_all(self, prompt: list[int], params: SamplingParams | None = None) -> list[int]:
        return list(self.generate(prompt, params))
