"""Continuous batching over a per-step token budget: pure Python, no tensors.

After vLLM v1: every step, `schedule()` returns `{request_id: num_tokens}`, the number of tokens
each request computes this step. A request is a list of token ids (prompt, then outputs) and how
many of them already have K/V in the cache (`num_computed`); prefill, a chunk of a long prefill
and a decode step are the same thing, "compute the next n tokens". Running requests go first
(oldest first), then waiting ones join while the budget, the sequence limit and the free blocks
allow, keeping one spare block per running request (so an admission does not force a preemption
a few steps later). A new request first maps the cached blocks of its prompt's prefix (automatic prefix
caching). When a running request needs a block and none is free, the newest running request is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed from
its tokens later (its outputs so far are kept). A request that could never fit (longer than the
model's context, or more blocks than the whole pool) finishes at once with an error and does not
touch the others.

`static=True` is the baseline a static-batching server gives: a batch is formed only when the
previous one has finished, and a member that finishes early keeps decoding (its tokens discarded,
its slot and blocks held) until the longest member finishes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from infq.runtime.kv_cache import BlockPool


@dataclass
class Request:
    request_id: Any
    prompt_ids: list[int]
    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    arrival: float = 0.0
    token_ids: list[int] = field(default_factory=list)  # prompt + outputs
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    keys: list = field(default_factory=list)  # prefix-cache keys of its full blocks
    num_registered: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at (last) admission
    num_preemptions: int = 0
    finish_reason: str | None = None  # "length", "stop", "error"
    error: str | None = None
    output_ids: list[int] = field(default_factory=list)  # final outputs, set when finished
    padding: bool = False  # static batching: finished, still decoding to hold its place
    spec_token_ids: list[int] = field(default_factory=list)  # draft tokens to verify this step (speculative.py)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_outputs(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SchedulerOutput:
    num_tokens: dict[Any, int]  # request id -> tokens to compute this step, in batch order
    preempted: list[Any] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) blocks

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens.values())


class Scheduler:
    def __init__(self, pool: BlockPool, max_model_len: int, max_num_batched_tokens: int = 512,
                 max_num_seqs: int = 64, static: bool = False) -> None:
        self.pool, self.max_model_len = pool, max_model_len
        self.max_num_batched_tokens, self.max_num_seqs, self.static = max_num_batched_tokens, max_num_seqs, static
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[Any, Request] = {}
        self.rejected: list[Request] = []  # finished with an error at add(), reported once by take_rejected()
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        """Queue `req`, or finish it at once with an error if it can never be served."""
        self.requests[req.request_id] = req
        need = len(req.prompt_ids) + req.max_tokens
        if not req.prompt_ids:
            self._reject(req, "the prompt is empty")
        elif req.max_tokens < 1:
            self._reject(req, f"max tokens {req.max_tokens} must be at least 1")
        elif need > self.max_model_len:
            self._reject(req, f"the prompt ({len(req.prompt_ids)} tokens) plus {req.max_tokens} new tokens "
                              f"exceeds the model's context of {self.max_model_len} tokens; shorten the prompt or "
                              "lower --max-new-tokens")
        elif self.pool.blocks_needed(need) > self.pool.num_blocks:
            self._reject(req, f"the request needs {self.pool.blocks_needed(need)} KV blocks; the pool has "
                              f"{self.pool.num_blocks}: raise --kv-memory")
        else:
            self.waiting.append(req)

    def _reject(self, req: Request, message: str) -> None:
        req.finish_reason, req.error = "error", message
        self.rejected.append(req)
        del self.requests[req.request_id]

    def take_rejected(self) -> list[Request]:
        out, self.rejected = self.rejected, []
        return out

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- scheduling -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput({})
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted and not (self.static and self.running):
            self._admit(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            spec = req.spec_token_ids  # drafts ride along as lookahead tokens; those past the budget are dropped
            n = min(req.num_tokens + len(spec) - req.num_computed, budget)
            del spec[max(0, req.num_computed + n - req.num_tokens):]
            while not (self.pool.grow(req.block_table, req.num_computed + n) and self._cow_tail(req, n, out)):
                victim = self.running.pop()  # the newest; never one scheduled already this step
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    return budget
            out.num_tokens[req.request_id] = n
            budget -= n
            i += 1
        return budget

    def _cow_tail(self, req: Request, n: int, out: SchedulerOutput) -> bool:
        """Copy-on-write for the blocks this step writes into, where they are shared (parallel
        samples of one prompt); False when a copy needs a free block and there is none."""
        bs = self.pool.block_size
        first, last = req.num_computed // bs, (req.num_computed + n - 1) // bs
        for index in range(first, last + 1):
            try:
                pair = self.pool.make_writable(req.block_table, index)
            except MemoryError:
                return False
            if pair is not None:
                out.copies.append(pair)
        return True

    def _preempt(self, req: Request) -> None:
        self.pool.free(req.block_table)
        req.spec_token_ids.clear()
        req.num_computed = req.num_registered = 0
        if req.padding:  # a static-batch filler: nothing to resume
            self.requests.pop(req.request_id, None)
            return
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        bs = self.pool.block_size
        while self.waiting and len(self.running) < self.max_num_seqs and (budget > 0 or self.static):
            req = self.waiting[0]
            # Leave at least one token to compute: its logits give the next token.
            keys = self.pool.block_keys(req.token_ids, (req.num_tokens - 1) // bs)
            table = self.pool.match_prefix(keys)
            hits = len(table)
            computed = hits * bs
            n = min(req.num_tokens - computed, budget)
            # Headroom: after this prompt's blocks, one free block per running request, so that
            # admitting it does not force preemptions (and recomputation) within the next steps.
            spare = self.pool.num_free - (self.pool.blocks_needed(req.num_tokens) - hits)
            if (self.running and spare < len(self.running)) or not self.pool.grow(table, computed + n):
                self.pool.free(table)
                return
            self.waiting.popleft()
            req.block_table, req.num_computed = table, computed
            req.num_registered = hits
            req.num_cached_tokens = computed
            self.running.append(req)
            if n > 0:
                out.num_tokens[req.request_id] = n
                budget -= n

    # -- results ----------------------------------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: dict[Any, int | list[int]]) -> list[Request]:
        """Advance every scheduled request by its tokens and append the sampled token of each that
        reached its end; returns the requests that finished this step. Speculative decoding passes a
        list instead: the accepted drafts, then one sampled token. The rejected drafts' KV is rolled
        back (their blocks freed), and a list is cut in place to the tokens kept before a stop."""
        finished = []
        for rid, n in out.num_tokens.items():
            req = self.requests[rid]
            req.num_computed += n
            new = sampled.get(rid)
            if isinstance(new, list):
                req.num_computed -= len(req.spec_token_ids) - (len(new) - 1)  # drop the rejected drafts' KV
                req.spec_token_ids.clear()
                self.pool.truncate(req.block_table, req.num_computed)
                req.token_ids.extend(new[:-1])
            req.num_registered = self.pool.cache_full_blocks(
                req.block_table, req.token_ids, req.num_computed, req.keys, req.num_registered)
            if req.num_computed < req.num_tokens:
                continue  # a chunk of a prefill: its logits are not needed
            tokens = new if isinstance(new, list) else [sampled[rid]]
            req.token_ids.append(tokens[-1])
            if req.padding:
                if req.num_tokens >= self.max_model_len:
                    self._release(req)
                continue
            stop = self._first_stop(req, len(tokens))
            if stop is not None:
                del tokens[stop[1] - (req.num_outputs - len(tokens)):]
                self.finish(req, *stop)
                finished.append(req)
        if self.static and self.running and all(r.padding for r in self.running):
            for req in list(self.running):
                self._release(req)
        return finished

    def add_fork(self, child: Request, parent: Request) -> bool:
        """Run `child`, a parallel sample forked off `parent` this step (its prompt computed, its
        first token appended), as the newest request; it shares the parent's prefix-cache keys.
        Returns True if that first token already finished it."""
        child.keys, child.num_registered = list(parent.keys), parent.num_registered
        self.requests[child.request_id] = child
        self.running.append(child)
        stop = self._first_stop(child, 1)
        if stop is not None:
            self.finish(child, *stop)
            return True
        return False

    def stop_reason(self, req: Request) -> str | None:
        if req.token_ids[-1] in req.stop_token_ids:
            return "stop"
        if req.num_outputs >= req.max_tokens:
            return "length"
        return None

    def _first_stop(self, req: Request, count: int) -> tuple[str, int] | None:
        """The first stop among the last `count` outputs: (reason, outputs kept up to it)."""
        for kept in range(req.num_outputs - count + 1, req.num_outputs + 1):
            if req.token_ids[len(req.prompt_ids) + kept - 1] in req.stop_token_ids:
                return "stop", kept
            if kept >= req.max_tokens:
                return "length", kept
        return None

    def finish(self, req: Request, reason: str, num_outputs: int | None = None) -> None:
        """Finish `req` keeping its first `num_outputs` outputs (all by default)."""
        keep = req.num_outputs if num_outputs is None else num_outputs
        req.finish_reason = reason
        req.output_ids = req.token_ids[len(req.prompt_ids):len(req.prompt_ids) + keep]
        if self.static and req in self.running:
            req.padding = True
            return
        self._release(req)

    def abort(self, req: Request) -> None:
        """Drop `req` wherever it is (waiting, running, a static-batch member), its blocks freed."""
        req.finish_reason = "abort"
        self._release(req)

    def _release(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.pool.free(req.block_table)
        self.requests.pop(req.request_id, None)

    def kv_usage(self) -> tuple[int, int]:
        """(token slots holding a computed token, token slots of the blocks in use) over running
        requests; shared blocks are counted once per request."""
        used = sum(r.num_computed for r in self.running)
        reserved = sum(len(r.block_table) for r in self.running) * self.pool.block_size
        return used, reserved
