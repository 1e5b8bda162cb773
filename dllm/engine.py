"""Engine: the generation loop on the coordinator (stage 0).

It owns the embedding, the head, sampling and the first layer range (a StageRunner), and
drives the rest of the model through a ``Pipeline`` — in-process runners or the remote chain,
which look the same from here. Continuous batching: every ``step()`` runs one forward pass
over all running sequences (one token each) plus as much waiting prefill as fits the token
budget, so new requests join between steps.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from dllm.batch import SeqChunk
from dllm.errors import ChainError, RequestError, StageBusy, StageFailure
from dllm.model.runner import StageRunner
from dllm.sampling import SamplingParams, filtered_probs, make_generator, sample
from dllm.spec.accept import sample_accept
from dllm.spec.tree import DraftTree, greedy_accept


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
    commit: tuple[int, tuple[int, ...]] | None = None  # accepted tree nodes to compact on the next pass
    error: str | None = None  # why it ended, when finish_reason is "error" or "busy"
    drafted: bool = False  # the drafter has proposed for it (its first proposal also prefills the draft's KV)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SpecStats:
    """Running totals of speculative verification, for metrics and the planner."""

    passes: int = 0
    drafted: int = 0
    accepted: int = 0  # tokens committed per pass (= drafts accepted + the bonus token)

    def record(self, drafted: int, accepted: int) -> None:
        self.passes += 1
        self.drafted += drafted
        self.accepted += accepted

    @property
    def mean_accepted(self) -> float:
        return self.accepted / self.passes if self.passes else 0.0


class Engine:
    def __init__(self, head: StageRunner, pipeline: Pipeline | None = None, eos_ids=(),
                 max_batch_tokens: int = 2048, max_seqs: int = 64, drafter=None, spec_depth: int = 4,
                 spec_width: int = 1, planner=None):
        self.head = head
        self.drafter = drafter
        self.spec_depth, self.spec_width = spec_depth, spec_width
        self.planner = planner
        self.stats = SpecStats()
        self.max_failovers = 3
        self.failovers = 0
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
            if self.drafter is not None:
                self.drafter.release(seq.seq_id)
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

    def tree_bounds(self):
        """(depth, width, growth rule or None) of the next draft tree: the planner's choice,
        else the fixed shape."""
        return self.planner.next_tree() if self.planner is not None else (self.spec_depth, self.spec_width, None)

    def _draft(self, s: Sequence) -> DraftTree | None:
        """A draft tree for a decode-ready sequence, or None for a plain one-token step."""
        if self.drafter is None:
            return None
        depth, width, growth = self.tree_bounds()
        depth = min(depth, s.params.max_tokens - len(s.output) - 1)
        if depth <= 0:
            return None
        t0 = time.perf_counter()
        tree = self.drafter.propose(s.seq_id, s.tokens, depth, width, growth=growth)
        if self.planner is not None and s.drafted:  # a first proposal's time is mostly the prompt's prefill
            # a model drafter steps once a level (a grown tree may stop short of ``depth``)
            self.planner.observe_draft(max(tree.depths()) if growth is not None else depth, time.perf_counter() - t0)
        s.drafted = True
        return tree if len(tree) > 1 else None

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Run one pass; return the sequences that got new tokens (finished ones included)."""
        self._admit()
        plan = self._schedule()
        if not plan:
            return []
        chunks, ids, trees = [], [], []
        for s, n in plan:
            tree = self._draft(s) if n == 1 else None
            if tree is None:
                chunks.append(SeqChunk(s.seq_id, s.cached, n, commit=s.commit))
                ids += s.tokens[s.cached:s.cached + n]
            else:
                chunks.append(SeqChunk(s.seq_id, s.cached, len(tree), tuple(tree.parents), commit=s.commit))
                ids += tree.tokens
            s.commit = None
            trees.append(tree)
        t0 = time.perf_counter()
        try:
            hidden = self.forward(torch.tensor(ids, device=self.model.device), chunks)
        except StageBusy as e:
            # no KV room on some stage: refuse the sequences this pass was starting, keep the rest
            for s, n in plan:
                if s.cached == 0:
                    s.error = str(e)
                    s.finish_reason = "busy"
                    self._release(s)
            return [s for s, _ in plan if s.finished]
        except StageFailure as e:
            self._failover(e)
            return []
        # rows whose logits we need: every node of a tree; the last row of a finished prompt/decode
        rows, row, done = [], 0, []
        for (s, n), c, tree in zip(plan, chunks, trees):
            if tree is not None:
                done.append((s, tree, len(rows)))
                rows += range(row, row + c.length)
            elif s.cached + n == len(s.tokens):
                done.append((s, None, len(rows)))
                rows.append(row + c.length - 1)
            else:
                s.cached += n  # a prefill chunk that is not the prompt's last
            row += c.length
        if not done:
            return []
        logits = self.model.logits(hidden[rows])
        plain = [(s, off) for s, tree, off in done if tree is None]
        if plain:
            tokens = sample(logits[[off for _, off in plain]], [s.params for s, _ in plain],
                            [s.generator for s, _ in plain]).tolist()
            for (s, _), t in zip(plain, tokens):
                s.cached = len(s.tokens)
                self._append(s, [t])
        for s, tree, off in done:
            if tree is not None:
                self._accept_tree(s, tree, logits[off:off + len(tree)])
        if self.planner is not None and any(t is not None for t in trees):
            # the whole pass but the draft: every stage, the round trip, the head over every node, the walk
            self.planner.observe_verify(len(ids), time.perf_counter() - t0)
        return [s for s, _, _ in done]

    def _accept_tree(self, s: Sequence, tree: DraftTree, logits: torch.Tensor) -> None:
        if s.params.greedy:
            accepted, bonus = greedy_accept(tree, logits.argmax(-1).tolist())
        else:
            probs = torch.stack([filtered_probs(row, s.params) for row in logits])
            accepted, bonus = sample_accept(tree, probs, s.generator)
        tree_start = s.cached
        s.cached += len(accepted)
        if accepted != list(range(len(accepted))):
            s.commit = (tree_start, tuple(accepted))  # rides on this sequence's next chunk
        self.stats.record(len(tree) - 1, len(accepted))
        if self.planner is not None:
            self.planner.observe(tree, accepted)
        self._append(s, [tree.tokens[i] for i in accepted[1:]] + [bonus])

    def _append(self, s: Sequence, tokens: list[int]) -> None:
        for token in tokens:
            s.output.append(token)
            if token in self.eos_ids and not s.params.ignore_eos:
                s.finish_reason = "stop"
            elif len(s.output) >= s.params.max_tokens:
                s.finish_reason = "length"
            if s.finished:
                self._release(s)
                return

    # ---- failover ----------------------------------------------------------------------------------
    def _failover(self, cause: Exception) -> None:
        """Swap dead stages for spares, then rebuild every stage's KV by replaying committed tokens.

        Replay is a prefill of exactly the tokens each sequence has committed, so the KV layout
        afterwards is what an uninterrupted run would hold, and decoding continues identically.
        """
        recover = getattr(self.pipeline, "recover", None)
        last = cause
        for _ in range(self.max_failovers):
            try:
                if recover is None:
                    raise ChainError(f"stage failure and no way to recover: {last}")
                recover()
                self._replay()
                self.failovers += 1
                return
            except StageFailure as e:
                last = e
            except ChainError as e:
                last = e
                break
        for s in list(self.running):
            s.error = f"stage chain failed: {last}"
            s.finish_reason = "error"
            self._release(s)
        raise ChainError(f"stage chain failed and could not be repaired: {last}")

    def _replay(self) -> None:
        todo = [(s, 0) for s in self.running if s.cached > 0]
        for s, _ in todo:
            s.commit = None
        while todo:
            budget, batch = self.max_batch_tokens, []
            while todo and budget > 0:
                s, at = todo.pop(0)
                n = min(s.cached - at, budget)
                batch.append((s, at, n))
                budget -= n
                if at + n < s.cached:
                    todo.insert(0, (s, at + n))
            chunks = [SeqChunk(s.seq_id, at, n) for s, at, n in batch]
            ids = [t for s, at, n in batch for t in s.tokens[at:at + n]]
            self.forward(torch.tensor(ids, device=self.model.device), chunks)

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
            if seq.finish_reason == "busy":
                raise StageBusy(seq.error or "a stage is busy")
        finally:
            if not seq.finished:
                self.abort(seq)

    def generate_all(self, prompt: list[int], params: SamplingParams | None = None) -> list[int]:
        return list(self.generate(prompt, params))
