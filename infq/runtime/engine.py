"""The serving loop: schedule -> build the flattened batch -> one model pass -> sample -> update.

`Engine` owns a `DecoderModel`, the block pool and KV tensors (`kv_cache.py`), and a `Scheduler`.
Each `step()` runs the model once over every token the scheduler picked (decode tokens, prefill
chunks, recomputation after preemption, all in one flattened batch with per-request positions
and paged attention), samples the next token of each request that reached the end of its tokens
(greedy, temperature, top-k, top-p, min-p, repetition penalty, see sampling.py; optionally with
log-probabilities; a `torch.Generator` per seeded request, so a request's text
does not depend on what it was batched with), applies EOS / stop ids / stop strings / max tokens,
and returns one `RequestOutput` per request that produced a token or finished. `stream()` yields
those step by step; `generate()` runs a list of prompts to completion. Parallel sampling
(`add_request(n=...)`): when the prompt's last token is computed, n - 1 more requests fork off it
over shared KV blocks (`BlockPool.fork`; the scheduler copies a shared block before writing it).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from infq.errors import InfqError
from infq.runtime.attention import PagedLayer, build_batch, select_backend
from infq.runtime.kv_cache import (
    BlockPool,
    KVCache,
    block_bytes,
    blocks_for_budget,
    kv_storage_dtype,
)
from infq.runtime.model import DecoderModel
from infq.runtime.sampling import SamplingParams, sample
from infq.runtime.scheduler import Request, Scheduler, SchedulerOutput


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_memory: int | None = None  # bytes for the KV pool; None: room for max_num_seqs full contexts (capped)
    kv_dtype: str = "auto"  # auto (the model's dtype), int8, fp8
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    prefix_caching: bool = True
    static: bool = False  # static batching (the benchmark's baseline)
    attention: str = "auto"  # auto, torch, triton
    cuda_graphs: bool = False  # decode steps replayed as CUDA graphs (runtime.graphs; eager padded off CUDA)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise InfqError(f"--block-size {self.block_size} must be at least 1 (8 on a CPU or 16 on a GPU are usual)")
        if self.max_num_seqs < 1:
            raise InfqError(f"--max-num-seqs {self.max_num_seqs} must be at least 1")
        if self.max_num_batched_tokens < 1:
            raise InfqError(f"--max-batched-tokens {self.max_num_batched_tokens} must be at least 1")
        if self.kv_memory is not None and self.kv_memory < 1:
            raise InfqError(f"--kv-memory {self.kv_memory} must be positive")


@dataclass
class RequestOutput:
    request_id: Any
    new_token_ids: list[int]
    token_ids: list[int]  # every output so far (the final outputs once finished)
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    text: str = ""  # decoded outputs so far (when the engine has a tokenizer)
    new_text: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float = 0.0
    tokens_per_s: float = 0.0
    e2e_s: float = 0.0
    sample_index: int = 0  # parallel sampling (add_request n > 1): which of the prompt's samples
    # add_request(logprobs=k): per output token {"token_id", "logprob", "top": [[id, logprob] x k]}
    logprobs: list[dict] | None = None


@dataclass(frozen=True)
class SampleId:
    """The request id of sample `index` >= 1 of request `parent` (sample 0 keeps the parent's id)."""

    parent: Any
    index: int


@dataclass
class _Track:
    """Engine-side state of a request: sampling, stop strings, timing, text."""

    params: SamplingParams
    generator: torch.Generator | None
    stop: tuple[str, ...]
    arrival: float
    first_token: float | None = None
    text: str = ""
    prefix: str = ""
    final_text: str | None = None  # the text cut at a stop string
    decode_times: list[float] = field(default_factory=list)
    forks: int = 0  # parallel samples still to fork off this request once its prompt is computed
    sample_index: int = 0
    num_logprobs: int = 0  # add_request(logprobs=k): k alternatives per output token, recorded when sampled
    logprobs: list[dict] = field(default_factory=list)


AUTO_KV_CAP = 4 * 2**30


def _logprob_entry(lp: torch.Tensor, token: int, k: int) -> dict:
    """One output token's log-probability and the k most likely alternatives, from a log-softmax row."""
    top = lp.topk(k)
    return {"token_id": token, "logprob": float(lp[token]),
            "top": [[int(t), float(v)] for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)]}


def default_block_size(device: str) -> int:
    """`--block-size` when not given: 16 tokens on CUDA (vLLM's GPU default, what the Triton kernels
    were measured with), 8 on a CPU. On the CPU the gather + SDPA path runs about as fast with 8
    (demo, Xeon, 2 threads, continuous batching, block 8 vs 16: default workload 2044 vs 2085 and
    1960 vs 1940 tok/s in two runs, short one 2663 vs 2343 and 2442 vs 2381) while a sequence's
    half-empty last block wastes half as much (1.5 % vs 3.2 % and 2.4 % vs 4.9 % of the slots)."""
    return 16 if str(device).startswith("cuda") else 8


class Engine:
    def __init__(self, model: DecoderModel, config: EngineConfig | None = None, *, eos_ids: Sequence[int] = (),
                 tokenizer: Any = None, speculator: Any = None) -> None:
        self.model, self.config, self.tokenizer = model, config or EngineConfig(), tokenizer
        cfg, c = model.cfg, self.config
        self.eos_ids = frozenset(eos_ids)
        self.max_model_len = cfg.max_position_embeddings
        storage = kv_storage_dtype(c.kv_dtype, model.dtype)
        budget = c.kv_memory
        if budget is None:
            full = c.max_num_seqs * -(-self.max_model_len // c.block_size) * block_bytes(cfg, c.block_size, storage)
            budget = min(full, AUTO_KV_CAP)
        num_blocks = blocks_for_budget(budget, cfg, c.block_size, storage)
        self.pool = BlockPool(num_blocks, c.block_size, c.prefix_caching)
        # With decode graphs the cache has one block more than the pool: the padding rows' scratch block.
        self.kv = KVCache(cfg, num_blocks + c.cuda_graphs, c.block_size, storage, model.device)
        self.scheduler = Scheduler(self.pool, self.max_model_len, c.max_num_batched_tokens, c.max_num_seqs, c.static)
        self.backend = select_backend(model.device, c.attention)
        self.graphs = None
        if c.cuda_graphs:
            from infq.runtime.graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, self.kv, self.backend, c.block_size, self.max_model_len,
                                       c.max_num_seqs, num_blocks, capture=model.device.type == "cuda")
        self.tracks: dict[Any, _Track] = {}
        self._ids = itertools.count()
        self.steps = 0
        self.peak_running = 0
        # speculative.Speculator: proposes drafts before each schedule, verifies them after the pass
        self.speculator = speculator
        # parallel samples due: parent id -> [(index, generator, first token, its logprob entry or None)]
        self._forks: dict[Any, list[tuple[int, torch.Generator | None, int, dict | None]]] = {}

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, max_tokens: int = 16,
                    *, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                    request_id: Any = None, arrival: float | None = None, n: int = 1, logprobs: int = 0) -> Any:
        """Queue a request; returns its id. One that can never run finishes with an error at the
        next step (the others are not disturbed). `n` > 1: parallel sampling, as vLLM's `n`: the
        prompt is computed once, then n - 1 more sequences fork off it sharing its KV blocks
        (copy-on-write), each sampling on its own (seed + i when seeded); their outputs carry
        request id `SampleId(id, i)` and `sample_index` i. `logprobs` = k > 0: each output token's
        log-probability under the model (log-softmax of the raw logits, before any sampling
        parameter, as vLLM reports by default) and the k most likely tokens'."""
        rid = next(self._ids) if request_id is None else request_id
        if rid in self.tracks:
            raise InfqError(f"request id {rid!r} is already in use")
        if n < 1:
            raise InfqError(f"--n {n} must be at least 1 (samples per prompt)")
        if n > 1 and (self.config.static or self.speculator is not None):
            raise InfqError("parallel sampling (--n > 1) runs with continuous batching and without --draft")
        if self.speculator is not None and params is not None and params.repetition_penalty != 1:
            raise InfqError("--repetition-penalty does not run with --draft (the draft's tokens would be judged "
                            "against a distribution that changes with each accepted token)")
        if logprobs < 0 or (logprobs and self.speculator is not None):
            raise InfqError(f"--logprobs {logprobs} must be >= 0, and runs without --draft")
        if n > self.config.max_num_seqs:
            raise InfqError(f"--n {n} exceeds --max-num-seqs {self.config.max_num_seqs}: the samples run at once")
        params = params or SamplingParams()
        stops = frozenset(stop_token_ids) | (frozenset() if ignore_eos else self.eos_ids)
        if stop and self.tokenizer is None:
            raise InfqError("stop strings need a tokenizer; pass tokenizer= to the engine")
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        now = time.perf_counter() if arrival is None else arrival
        track = _Track(params, gen, tuple(stop), now, forks=n - 1, num_logprobs=min(logprobs, self.model.cfg.vocab_size))
        if self.tokenizer is not None:
            track.prefix = self.tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
        self.tracks[rid] = track
        self.scheduler.add(Request(rid, list(prompt_ids), max_tokens, stops, arrival=now))
        return rid

    def abort(self, request_id: Any) -> bool:
        """Drop a queued or running request (and its parallel samples, forked or not) without an
        output, its KV blocks freed, as vLLM's `abort_request` does for a client that went away;
        False if no such request is unfinished."""
        ids = [request_id] + [rid for rid in self.tracks if isinstance(rid, SampleId) and rid.parent == request_id]
        found = False
        for rid in ids:
            req = self.scheduler.requests.get(rid)
            if req is not None and not req.finished:
                self.scheduler.abort(req)
                found = True
            self._forks.pop(rid, None)
            found = self.tracks.pop(rid, None) is not None or found
        self.scheduler.rejected = [r for r in self.scheduler.rejected if r.request_id != request_id]
        return found

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.scheduler.rejected)

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = [self._output(req, []) for req in self.scheduler.take_rejected()]
        if self.speculator is not None:
            self.speculator.propose(self)
        sched = self.scheduler.schedule()
        self.peak_running = max(self.peak_running, len(self.scheduler.running))
        if sched.num_tokens:
            self.kv.copy_blocks(sched.copies)
            reqs = {rid: self.scheduler.requests[rid] for rid in sched.num_tokens}
            sampled = self._run(sched, list(reqs.values()))
            self.steps += 1
            children = self._fork(reqs, sampled)  # before update, which may finish (and free) a parent
            finished = {r.request_id for r in self.scheduler.update(sched, sampled)}
            for parent, child in children:
                if self.scheduler.add_fork(child, parent):
                    finished.add(child.request_id)
                reqs[child.request_id] = child
                sampled[child.request_id] = child.token_ids[-1]
            if self.speculator is not None:
                self.speculator.after_step(self, sched)
            now = time.perf_counter()
            for rid, token in sampled.items():
                new = token if isinstance(token, list) else [token]  # a list: speculative decoding
                req = reqs[rid]
                if req.padding and rid not in finished:
                    continue
                track = self.tracks[rid]
                if track.first_token is None:
                    track.first_token = now
                track.decode_times.extend([now] * len(new))
                if track.stop and not req.finished:
                    self._check_stop_strings(req, track)
                outputs.append(self._output(req, new))
        for out in outputs:
            if out.finished:
                del self.tracks[out.request_id]
        return outputs

    def _run(self, sched: SchedulerOutput, reqs: list[Request]) -> dict[Any, int] | dict[Any, list[int]]:
        """Run the model over the scheduled tokens; the sampled token of each request at its end
        (with a speculator: the accepted drafts and one sampled token, as a list)."""
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        sampling: list[Request] = []
        for req in reqs:
            s, n = req.num_computed, sched.num_tokens[req.request_id]
            spec = req.spec_token_ids  # draft tokens to verify: logits for each of them and the bonus
            ids.extend((req.token_ids + spec)[s:s + n] if spec else req.token_ids[s:s + n])
            positions.extend(range(s, s + n))
            if s + n == req.num_tokens + len(spec):
                rows.extend(range(len(ids) - 1 - len(spec), len(ids)))
                sampling.append(req)
        if (self.graphs is not None and self.speculator is None and len(ids) == len(reqs) == len(sampling)
                and len(reqs) <= self.graphs.max_batch):  # every request decodes one token: a graph step
            return self._sample(self.graphs.run(ids, positions, [r.block_table for r in reqs]), sampling)
        dev = self.model.device
        batch = build_batch([r.block_table for r in reqs], [r.num_computed for r in reqs],
                            list(sched.num_tokens.values()), self.pool.block_size, dev)
        layers = [PagedLayer(self.backend, self.kv, i, batch) for i in range(self.model.cfg.num_layers)]
        logits = self.model.forward_paged(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev),
                                          layers, torch.tensor(rows, dtype=torch.long, device=dev))  # (R, V)
        if self.speculator is not None:
            return self.speculator.verify(self, logits, sampling)
        return self._sample(logits, sampling)

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> dict[Any, int]:
        """logits (R, V) -> {request id: token}; greedy rows at once, sampled rows one by one. A
        request due to fork parallel samples also gets their first tokens from its row (`_forks`)."""
        greedy = logits.argmax(-1).tolist()
        out = {}
        for i, req in enumerate(reqs):
            track = self.tracks.get(req.request_id)  # None: a static-batch filler, already reported
            plain = track is None or (track.params.temperature == 0 and track.params.repetition_penalty == 1)
            if plain:
                out[req.request_id] = greedy[i]
            else:
                out[req.request_id] = int(sample(logits[i:i + 1].float().cpu(), track.params, track.generator,
                                                 req.token_ids)[0])
            lp = logits[i].float().log_softmax(-1) if track is not None and track.num_logprobs else None
            if lp is not None:
                track.logprobs.append(_logprob_entry(lp, out[req.request_id], track.num_logprobs))
            if track is not None and track.forks and req.num_outputs == 0:
                self._forks[req.request_id] = []
                for j in range(1, track.forks + 1):
                    p = track.params
                    gen = torch.Generator().manual_seed(p.seed + j) if p.seed is not None else None
                    tok = greedy[i] if plain else int(sample(logits[i:i + 1].float().cpu(), p, gen, req.token_ids)[0])
                    entry = _logprob_entry(lp, tok, track.num_logprobs) if lp is not None else None
                    self._forks[req.request_id].append((j, gen, tok, entry))
        return out

    def _fork(self, reqs: dict[Any, Request], sampled: dict[Any, Any]) -> list[tuple[Request, Request]]:
        """The parallel samples of every request whose prompt was computed this step: new requests
        over a fork of its block table (every block shared, the last partial one copied on its
        first write), their first token sampled from the same logits."""
        out = []
        for rid, samples in self._forks.items():
            parent, track = reqs[rid], self.tracks[rid]
            computed = len(parent.token_ids)  # the prompt, computed this step (its first token comes after update)
            for j, gen, tok, entry in samples:
                cid = SampleId(rid, j)
                child = Request(cid, list(parent.prompt_ids), parent.max_tokens, parent.stop_token_ids,
                                arrival=parent.arrival, token_ids=[*parent.token_ids, tok], num_computed=computed,
                                block_table=self.pool.fork(parent.block_table))
                child.num_cached_tokens = parent.num_cached_tokens
                ctrack = _Track(track.params, gen, track.stop, track.arrival, prefix=track.prefix, sample_index=j,
                                num_logprobs=track.num_logprobs, logprobs=[entry] if entry is not None else [])
                self.tracks[cid] = ctrack
                out.append((parent, child))
            track.forks = 0
        self._forks.clear()
        return out

    def _text(self, req: Request, ids: list[int]) -> str:
        track = self.tracks[req.request_id]
        return self.tokenizer.decode(req.prompt_ids + ids, skip_special_tokens=True)[len(track.prefix):]

    def _check_stop_strings(self, req: Request, track: _Track) -> None:
        text = self._text(req, req.token_ids[len(req.prompt_ids):])
        hits = [text.find(s, max(0, len(track.text) - len(s))) for s in track.stop]
        hits = [h for h in hits if h >= 0]
        if hits:
            self.scheduler.finish(req, "stop")
            track.final_text = text[:min(hits)]  # the stop string itself is not part of the text

    def _output(self, req: Request, new: list[int]) -> RequestOutput:
        track = self.tracks[req.request_id]
        ids = req.output_ids if req.finished else req.token_ids[len(req.prompt_ids):]
        out = RequestOutput(req.request_id, new, list(ids), req.finished, req.finish_reason, req.error,
                            prompt_tokens=len(req.prompt_ids), cached_tokens=req.num_cached_tokens,
                            sample_index=track.sample_index,
                            logprobs=track.logprobs[:len(ids)] if track.num_logprobs else None)
        if self.tokenizer is not None and req.error is None:
            text = track.final_text if track.final_text is not None else self._text(req, list(ids))
            if not req.finished and text.endswith("\ufffd"):  # an unfinished multi-byte character
                text = track.text
            out.new_text, out.text = text[len(track.text):] if text.startswith(track.text) else text, text
            track.text = text
        if track.first_token is not None:
            out.ttft_s = track.first_token - track.arrival
            last = track.decode_times[-1]
            out.e2e_s = last - track.arrival
            n = len(track.decode_times)
            out.tokens_per_s = (n - 1) / (last - track.first_token) if n > 1 and last > track.first_token else 0.0
        return out

    # -- drivers ----------------------------------------------------------------------------------
    def stream(self) -> Iterator[list[RequestOutput]]:
        """Step until every queued request has finished, yielding each step's outputs."""
        while self.has_unfinished():
            yield self.step()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None,
                 max_tokens: int = 16, **kwargs: Any) -> list[RequestOutput]:
        """Run `prompts` together to completion; the final output of each, in order."""
        ids = [self.add_request(p, params, max_tokens, **kwargs) for p in prompts]
        final: dict[Any, RequestOutput] = {}
        for outs in self.stream():
            for o in outs:
                if o.finished:
                    final[o.request_id] = o
        return [final[i] for i in ids]
