"""Speculative decoding inside the continuous-batching engine: draft, verify, roll back.

Before each engine step a proposer drafts up to K tokens for every request that is decoding: a
draft model (any checkpoint `loader.py` reads that shares the target's vocabulary, with its own
paged KV cache, its requests batched like the target's) or prompt lookup (`ngram`: the tokens that
followed the latest earlier occurrence of the sequence's last n tokens; no model). The drafts ride
in the scheduler as lookahead tokens (`Request.spec_token_ids`), so the target computes the last
accepted token and every draft of every request in the step's one forward pass, inside the token
budget, and returns logits for each of them. Verification is Leviathan et al.'s rule: draft token
x is accepted with probability min(1, p(x)/q(x)); at the first rejection the token is resampled from
normalize(max(0, p - q)); when all are accepted a bonus token is sampled from p. An n-gram draft is
a point mass (q(x) = 1). Greedy requests accept while the draft equals the target's argmax, so their
output is exactly the target's greedy output. The scheduler then rolls the target's cache back to
the accepted tokens (blocks past them are freed) and `rollback` does the same in the draft's cache.

`--num-draft auto` picks K per request and step: a is the request's acceptance rate so far (shrunk
towards the global rate), c the measured cost of one draft token plus one more verified token
relative to a target step, and K in 1..8 maximises (1 - a^(K+1)) / (1 - a) / (1 + K c).
Limits: the draft pool does no prefix caching (a draft recomputes shared prompts); static batching
is refused; sampled drafts keep their distributions q for the verification (K rows of V floats per
request).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from infq.errors import InfqError
from infq.runtime.attention import PagedLayer, build_batch, select_backend
from infq.runtime.kv_cache import BlockPool, KVCache
from infq.runtime.model import DecoderModel
from infq.runtime.sampling import SamplingParams, probs
from infq.runtime.scheduler import Request

MAX_AUTO_K = 8
PROBE_EVERY = 8  # auto K at 0: a request still drafts one token every this many steps, to keep measuring


# -- the acceptance rule ----------------------------------------------------------------------------
class Rng(Protocol):
    def bernoulli(self, prob: float) -> bool: ...

    def categorical(self, p: Tensor) -> int: ...


class TorchRng:
    """The two random choices verification makes, drawn from a request's generator."""

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator

    def bernoulli(self, prob: float) -> bool:
        return float(torch.rand((), generator=self.generator)) < prob

    def categorical(self, p: Tensor) -> int:
        return int(torch.multinomial(p.float(), 1, generator=self.generator))


def residual(p: Tensor, q: Tensor | None, x: int) -> Tensor:
    """normalize(max(0, p - q)) over the vocabulary (V,); q None: a point mass on x."""
    if q is None:
        r = p.clone()
        r[x] = 0
    else:
        r = (p - q).clamp_(min=0)
    total = r.sum()
    return r / total if total > 0 else p  # p == q up to rounding: nothing is left to correct


def verify_sampled(p: Tensor, draft: Sequence[int], q: Tensor | None, rng: Rng) -> list[int]:
    """Accept a prefix of `draft` (k tokens) against target probabilities p (k+1, V); q (k, V)
    the draft's probabilities, None for point masses. Returns the accepted drafts, then one token:
    resampled from the residual at the first rejection, or a bonus token from p[k]."""
    out: list[int] = []
    for i, x in enumerate(draft):
        px = float(p[i, x])
        qx = 1.0 if q is None else float(q[i, x])
        if qx <= 0:
            accept = px > 0
        else:
            accept = px >= qx or rng.bernoulli(px / qx)
        if not accept:
            out.append(rng.categorical(residual(p[i], None if q is None else q[i], x)))
            return out
        out.append(x)
    out.append(rng.categorical(p[len(draft)]))
    return out


def verify_greedy(target: Sequence[int], draft: Sequence[int]) -> list[int]:
    """target: the target's argmax at each of the k+1 positions. Accept while they agree."""
    out: list[int] = []
    for t, x in zip(target, draft, strict=False):
        if t != x:
            break
        out.append(x)
    out.append(target[len(out)])
    return out


def expected_tokens(a: float, k: int) -> float:
    """Tokens per target step for i.i.d. acceptance a and k drafts: (1 - a^(k+1)) / (1 - a)."""
    return float(k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def expected_tokens_at(rates: Sequence[float], k: int) -> float:
    """Tokens per target step for k drafts whose j-th is accepted with probability rates[j] given
    that all before it were (the last rate carries on past the end): 1 + sum_j prod_(i<=j) rates[i]."""
    total, run = 1.0, 1.0
    for j in range(k):
        run *= rates[min(j, len(rates) - 1)]
        total += run
    return total


def choose_k(a: float | Sequence[float], c: float, k_max: int = MAX_AUTO_K) -> int:
    """K in 0..k_max maximising expected tokens per unit of time, 1 + K c; 0 (plain decoding, one
    token per step) when no draft length beats it. `a`: one acceptance rate (i.i.d. positions), or
    the conditional rate of each draft position (`expected_tokens_at`)."""
    rates = [a] if isinstance(a, float | int) else list(a)
    return max(range(k_max + 1), key=lambda k: expected_tokens_at(rates, k) / (1 + k * c))


# -- proposers --------------------------------------------------------------------------------------
@dataclass
class Proposal:
    tokens: list[int]
    q: Tensor | None = None  # (k, V) the draft's distributions (sampled drafts of a draft model)


class NgramProposer:
    """Prompt lookup: the tokens after the latest earlier occurrence of the last n tokens, for n
    from `max_n` down to `min_n`. Each request keeps an index n-gram -> latest start, extended as
    its tokens grow (tokens are only ever appended), so a lookup costs O(max_n), not a scan."""

    name = "ngram"

    def __init__(self, max_n: int = 3, min_n: int = 1) -> None:
        self.max_n, self.min_n = max_n, min_n
        self.index: dict[Any, _NgramIndex] = {}

    def propose(self, reqs: list[Request], ks: list[int], sampling: list[tuple[SamplingParams, Any]]) -> list[Proposal]:
        out = []
        for req, k in zip(reqs, ks, strict=True):
            index = self.index.setdefault(req.request_id, _NgramIndex(self.min_n, self.max_n))
            out.append(Proposal(index.lookup(req.token_ids, k) if k else []))
        return out

    def rollback(self, request_id: Any, num_tokens: int) -> None:
        pass  # the index only covers tokens the request has (accepted drafts included)

    def retain(self, request_ids: set) -> None:
        for rid in [r for r in self.index if r not in request_ids]:
            del self.index[rid]


class _NgramIndex:
    """For each n, the latest start i of every n-gram of the tokens with i + n < len(tokens)
    (an occurrence with a continuation, never the suffix itself)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.sizes = range(max_n, min_n - 1, -1)
        self.starts: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.done = {n: 0 for n in self.sizes}  # starts indexed so far

    def lookup(self, tokens: Sequence[int], k: int) -> list[int]:
        size = len(tokens)
        for n in self.sizes:
            table = self.starts[n]
            for i in range(self.done[n], size - n):
                table[tuple(tokens[i:i + n])] = i
            self.done[n] = max(self.done[n], size - n)
            i = table.get(tuple(tokens[size - n:])) if size > n else None
            if i is not None:
                return list(tokens[i + n:i + n + k])
        return []


def lookup(tokens: Sequence[int], k: int, max_n: int, min_n: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
    size = len(tokens)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = list(tokens[size - n:])
        last = suffix[-1]
        for i in range(size - n - 1, -1, -1):
            if tokens[i + n - 1] == last and list(tokens[i:i + n]) == suffix:
                return list(tokens[i + n:i + n + k])
    return []


@dataclass
class _DraftSeq:
    table: list[int] = field(default_factory=list)
    computed: int = 0  # tokens of the request whose K/V are in the draft's cache


def shares_kv_layout(draft: Any, target: Any) -> bool:
    """Whether a draft's K/V are laid out as the target's (ModelConfigs): same layers, KV heads,
    head size and rotary embedding, so that the target's cached K/V can stand in for the draft's."""
    keys = ("num_layers", "num_kv_heads", "head_dim", "rope_theta", "rope_scaling", "sliding_windows")
    return all(getattr(draft, k) == getattr(target, k) for k in keys)


class DraftModelProposer:
    """A draft model with its own block pool and KV tensors; the requests' drafts are batched: one
    catch-up pass over each request's tokens the draft has not seen, then one pass per draft token.

    `target_kv` (the target engine's KVCache, unquantized, of a draft whose K/V are laid out as the
    target's: a quantized copy of it): a new request's prompt K/V are copied from the target's cache,
    cast to the draft's dtype, instead of being computed by a draft prefill, as QSpec does for its
    low-precision draft. The output stays the target's (verification decides); the draft's proposals
    see the target's prompt K/V where its own would carry its quantization error. Worth it where the
    draft's prefill is dear: PyTorch's CPU int4 kernel re-dequantizes the weight for every 4 rows,
    so a 57-token prompt costs the 1B draft 0.92 s, about 21 of its one-token passes."""

    def __init__(self, model: DecoderModel, num_blocks: int, block_size: int, name: str = "draft",
                 target_kv: KVCache | None = None) -> None:
        self.model, self.name = model, name
        self.pool = BlockPool(num_blocks, block_size, prefix_caching=False)
        self.kv = KVCache(model.cfg, num_blocks, block_size, model.dtype, model.device)
        self.target_kv = target_kv if target_kv is not None and not target_kv.quantized else None
        if self.target_kv is not None and self.target_kv.block_size != block_size:
            raise ValueError("the target's KV blocks must be the draft's size to share them")
        self.backend = select_backend(model.device)
        self.seqs: dict[Any, _DraftSeq] = {}
        # The last `propose`: seconds of each pass, and the most tokens one sequence fed into its first.
        self.pass_seconds: list[float] = []
        self.catch_up = 0

    def propose(self, reqs: list[Request], ks: list[int], sampling: list[tuple[SamplingParams, Any]]) -> list[Proposal]:
        out = [Proposal([]) for _ in reqs]
        live = []
        for i, (req, k) in enumerate(zip(reqs, ks, strict=True)):
            k = min(k, self.model.cfg.max_position_embeddings - req.num_tokens + 1)
            if k <= 0:
                continue
            seq = self.seqs.setdefault(req.request_id, _DraftSeq())
            if not self.pool.grow(seq.table, req.num_tokens + k - 1):
                self.release(req.request_id)  # the draft pool is full: this request decodes plainly
                continue
            live.append((i, k, seq))
        if self.target_kv is not None:
            for i, _, seq in live:
                if seq.computed == 0 and reqs[i].num_computed > 1:
                    self._copy_prompt(reqs[i], seq)
        feed = {i: reqs[i].token_ids[seq.computed:] for i, _, seq in live}
        qs: dict[int, list[Tensor]] = {i: [] for i, _, _ in live}
        self.pass_seconds, self.catch_up = [], max((len(f) for f in feed.values()), default=0)
        start = time.perf_counter()
        for step in range(max((k for _, k, _ in live), default=0)):
            batch = [(i, seq) for i, k, seq in live if k > step]
            logits = self._forward([feed[i] for i, _ in batch], [seq for _, seq in batch])  # (B, V)
            for row, (i, seq) in enumerate(batch):
                seq.computed += len(feed[i])
                params, generator = sampling[i]
                if params.temperature == 0:
                    token = int(logits[row].argmax())
                else:
                    q = probs(logits[row:row + 1].float().cpu(), params)[0]  # (V,) on the generators' device
                    token = int(torch.multinomial(q, 1, generator=generator))
                    qs[i].append(q)
                out[i].tokens.append(token)
                feed[i] = [token]
            now = time.perf_counter()  # after int(...) has waited for the pass's logits
            self.pass_seconds.append(now - start)
            start = now
        for i, _, _ in live:  # each sequence now caches its tokens and its first k - 1 drafts
            if qs[i]:
                out[i].q = torch.stack(qs[i])  # (k, V)
        return out

    def _copy_prompt(self, req: Request, seq: _DraftSeq) -> None:
        """The K/V of the request's computed tokens, from the target's blocks into the draft's
        (whole blocks: slots past the computed tokens are overwritten before they are read)."""
        n = req.num_computed
        nb = -(-n // self.pool.block_size)
        dev = self.kv.k[0].device
        src = torch.tensor(req.block_table[:nb], device=dev)
        dst = torch.tensor(seq.table[:nb], device=dev)
        for mine, theirs in ((self.kv.k, self.target_kv.k), (self.kv.v, self.target_kv.v)):
            for d, t in zip(mine, theirs, strict=True):
                d[dst] = t.index_select(0, src).to(d.dtype)
        seq.computed = n

    def _forward(self, feeds: list[list[int]], seqs: list[_DraftSeq]) -> Tensor:
        """One draft pass over each sequence's `feed` tokens -> logits (B, V) at each last one."""
        dev = self.model.device
        ids = [t for f in feeds for t in f]
        positions = [p for f, s in zip(feeds, seqs, strict=True) for p in range(s.computed, s.computed + len(f))]
        counts = [len(f) for f in feeds]
        rows = torch.tensor(counts, device=dev).cumsum(0) - 1  # (B,)
        batch = build_batch([s.table for s in seqs], [s.computed for s in seqs], counts, self.pool.block_size, dev)
        layers = [PagedLayer(self.backend, self.kv, i, batch) for i in range(self.model.cfg.num_layers)]
        return self.model.forward_paged(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev),
                                        layers, rows)

    def rollback(self, request_id: Any, num_tokens: int) -> None:
        """Keep the draft's K/V of the first `num_tokens` tokens only; free the blocks past them."""
        seq = self.seqs.get(request_id)
        if seq is not None:
            seq.computed = min(seq.computed, num_tokens)
            self.pool.truncate(seq.table, seq.computed)

    def release(self, request_id: Any) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.pool.free(seq.table)

    def retain(self, request_ids: set) -> None:
        """Free the draft state of every request not in `request_ids` (finished or preempted)."""
        for rid in [r for r in self.seqs if r not in request_ids]:
            self.release(rid)


# -- the engine's side ------------------------------------------------------------------------------
@dataclass
class _Pending:
    base: int  # the request's tokens when its drafts were proposed
    q: Tensor | None


@dataclass
class SpecStats:
    verifications: int = 0  # (request, target step) pairs that decoded
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    draft_seconds: float = 0.0
    draft_passes: int = 0  # draft-model forward passes (steps x the longest proposal)

    def as_dict(self) -> dict[str, float]:
        rate = self.accepted / self.drafted if self.drafted else 0.0
        per_step = self.emitted / self.verifications if self.verifications else 0.0
        mean_k = self.drafted / self.verifications if self.verifications else 0.0
        return {"acceptance_rate": rate, "tokens_per_target_step": per_step, "mean_num_draft": mean_k,
                "drafted_tokens": self.drafted, "accepted_tokens": self.accepted,
                "target_steps": self.verifications, "draft_seconds": self.draft_seconds,
                "draft_passes": self.draft_passes}


class Speculator:
    """The engine's hooks: `propose` before each schedule, `verify` after the target's pass,
    `after_step` after the scheduler's update. `num_draft` is K, or None for auto."""

    def __init__(self, proposer: NgramProposer | DraftModelProposer, num_draft: int | None) -> None:
        if num_draft is not None and num_draft < 1:
            raise InfqError(f"--num-draft {num_draft} must be at least 1 (or auto)")
        self.proposer, self.num_draft = proposer, num_draft
        self.stats = SpecStats()
        self.pending: dict[Any, _Pending] = {}
        self.per_request: dict[Any, list[int]] = {}  # request id -> [drafted, accepted]
        self.idle_steps: dict[Any, int] = {}  # request id -> steps auto K chose 0 for
        self.positions = [[0, 0] for _ in range(MAX_AUTO_K)]  # draft position -> [reached, accepted]
        self.cost = _CostModel()
        self._proposed_at: float | None = None  # when this step's drafts were ready (times the target's pass)

    def _k(self, req: Request) -> int:
        room = req.max_tokens - req.num_outputs - 1  # the step always adds one token of its own
        if self.num_draft is not None:
            return max(0, min(self.num_draft, room))
        drafted, accepted = self.per_request.get(req.request_id, (0, 0))
        glob = self.stats.accepted / self.stats.drafted if self.stats.drafted else 0.6
        a = (accepted + 2 * glob) / (drafted + 2)  # shrunk towards the global rate
        k = choose_k(self._position_rates(a, glob), self.cost.ratio())
        if k == 0:  # speculation does not pay now: decode plainly, but probe now and then
            idle = self.idle_steps.get(req.request_id, 0) + 1
            self.idle_steps[req.request_id] = idle
            k = 0 if idle % PROBE_EVERY else 1
        return max(0, min(k, room))

    def _position_rates(self, a: float, glob: float) -> list[float]:
        """Auto K's acceptance per draft position, given that every earlier draft was accepted.
        Acceptances come in runs (a draft that gets one token right tends to get the next ones
        right), so the conditional rate grows along the draft and the i.i.d. formula undervalues
        long drafts: measured over all requests (each shrunk towards the global rate; a position
        never reached takes the rate of the one before it), scaled by this request's rate `a`
        over the global one."""
        rates, prev = [], glob
        for tested, accepted in self.positions:
            prev = (accepted + 2 * glob) / (tested + 2) if tested else prev
            rates.append(min(prev * a / glob if glob > 0 else a, 0.99))
        return rates

    def propose(self, engine: Any) -> None:
        self._drop_pending(engine)
        self._proposed_at = None
        reqs = [r for r in engine.scheduler.running if r.num_computed == r.num_tokens - 1 and not r.padding]
        if not reqs:
            return
        ks = [self._k(r) for r in reqs]
        if not any(ks):  # nobody drafts this step (auto K at 0, or no room left)
            for req in reqs:
                req.spec_token_ids = []
            return
        sampling = [(engine.tracks[r.request_id].params, engine.tracks[r.request_id].generator) for r in reqs]
        start = time.perf_counter()
        proposals = self.proposer.propose(reqs, ks, sampling)
        self._proposed_at = time.perf_counter()
        seconds = self._proposed_at - start
        self.stats.draft_seconds += seconds
        if isinstance(self.proposer, DraftModelProposer):
            times = self.proposer.pass_seconds
            self.stats.draft_passes += len(times)
            # What one more draft token costs: a one-token pass. The first pass also catches up on
            # the tokens the draft has not seen (a new request's whole prompt, or the last draft
            # and the bonus token after a full acceptance): kept out unless it fed one token.
            if len(times) > 1:
                self.cost.draft(sum(times[1:]), len(times) - 1)
            elif times and self.proposer.catch_up == 1:
                self.cost.draft(times[0], 1)
        else:
            self.cost.draft(seconds, 0)  # prompt lookup: the whole proposal counts as one pass
        for req, prop in zip(reqs, proposals, strict=True):
            req.spec_token_ids = list(prop.tokens)
            self.pending[req.request_id] = _Pending(req.num_tokens, prop.q)

    def verify(self, engine: Any, logits: Tensor, reqs: list[Request]) -> dict[Any, list[int]]:
        """logits (sum of k_r + 1, V): each request's rows for its last token and its k_r drafts."""
        if self._proposed_at is not None:
            self.cost.target(time.perf_counter() - self._proposed_at, len(logits))
            self._proposed_at = None
        out, start = {}, 0
        for req in reqs:
            draft = req.spec_token_ids
            rows = logits[start:start + len(draft) + 1]  # (k+1, V)
            start += len(draft) + 1
            track = engine.tracks[req.request_id]
            pend = self.pending.pop(req.request_id, None)
            if track.params.temperature == 0:
                tokens = verify_greedy(rows.argmax(-1).tolist(), draft)
            else:
                q = None if pend is None or pend.q is None else pend.q[:len(draft)]
                if q is None and draft and not isinstance(self.proposer, NgramProposer):
                    raise AssertionError("a sampled model draft without its distribution")
                p = probs(rows.float().cpu(), track.params)  # (k+1, V); the engine's generators live on the CPU
                tokens = verify_sampled(p, draft, q, TorchRng(track.generator))
            if pend is not None:
                self._count(req.request_id, len(draft), len(tokens) - 1)
                self.proposer.rollback(req.request_id, pend.base + len(tokens) - 1)
            out[req.request_id] = tokens
        return out

    def _count(self, rid: Any, drafted: int, accepted: int) -> None:
        s = self.stats
        s.verifications += 1
        s.drafted += drafted
        s.accepted += accepted
        s.emitted += accepted + 1
        mine = self.per_request.setdefault(rid, [0, 0])
        mine[0] += drafted
        mine[1] += accepted
        for j in range(min(accepted + 1, drafted, MAX_AUTO_K)):  # positions the verification reached
            self.positions[j][0] += 1
            self.positions[j][1] += j < accepted

    def after_step(self, engine: Any, sched: Any) -> None:
        self._drop_pending(engine)
        running = {r.request_id for r in engine.scheduler.running}
        self.proposer.retain(running)
        for rid in [r for r in self.per_request if r not in engine.scheduler.requests]:
            del self.per_request[rid]
        for rid in [r for r in self.idle_steps if r not in engine.scheduler.requests]:
            del self.idle_steps[rid]

    def _drop_pending(self, engine: Any) -> None:
        """Drafts the scheduler did not run this step (no budget left, or preempted): forget them."""
        for rid, pend in self.pending.items():
            req = engine.scheduler.requests.get(rid)
            if req is not None:
                req.spec_token_ids.clear()
            self.proposer.rollback(rid, pend.base)
        self.pending.clear()

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"draft": self.proposer.name,
                               "num_draft": "auto" if self.num_draft is None else self.num_draft}
        out.update(self.stats.as_dict())
        a, k = out["acceptance_rate"], out["mean_num_draft"]
        out["formula_tokens_per_target_step"] = expected_tokens(a, k)  # at the mean K (real-valued)
        return out


class _CostModel:
    """Exponential averages of the seconds one draft pass takes and of a target step's seconds as
    a line in its number of logit rows (alpha + beta * rows); `ratio` is c for `choose_k`."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self.draft_pass: float | None = None
        self.sums = [0.0] * 5  # weight, x, y, xx, xy

    def draft(self, seconds: float, passes: int) -> None:
        x = seconds / max(passes, 1)  # prompt lookup: the whole proposal counts as one pass
        self.draft_pass = x if self.draft_pass is None else self.decay * self.draft_pass + (1 - self.decay) * x

    def target(self, seconds: float, rows: int) -> None:
        d = self.decay
        self.sums = [d * s + (1 - d) * v for s, v in zip(self.sums, (1.0, rows, seconds, rows * rows, rows * seconds), strict=True)]

    def ratio(self) -> float:
        w, x, y, xx, xy = self.sums
        if w == 0 or self.draft_pass is None:
            return 0.0
        x, y, xx, xy = x / w, y / w, xx / w, xy / w
        var = xx - x * x
        beta = max(0.0, (xy - x * y) / var) if var > 1e-12 else 0.0
        step = max(y - beta * (x - 1), 1e-9)  # a one-row step
        return (self.draft_pass + beta) / step


def parse_num_draft(text: str | int) -> int | None:
    """'auto' -> None; a positive integer -> K."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        k = int(text)
    except ValueError:
        raise InfqError(f"--num-draft {text!r} is not a number; pass K >= 1 or auto") from None
    if k < 1:
        raise InfqError(f"--num-draft {k} must be at least 1 (or auto)")
    return k


def check_draft(target: Any, draft: Any, name: str) -> None:
    """Refuse a draft (a loader.LoadedModel) whose vocabulary is not the target's."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise InfqError(f"draft {name} has a vocabulary of {dv} tokens, the target {tv}; a draft must use the "
                        "target's tokenizer (pick a draft from the same model family, or --draft ngram)")
    tt, dt = _token_strings(target.tokenizer), _token_strings(draft.tokenizer)
    if tt is not None and dt is not None and tt != dt:
        raise InfqError(f"draft {name} has a different tokenizer from the target's (same size, other tokens); "
                        "a draft must use the target's tokenizer (or --draft ngram)")


def _token_strings(tokenizer: Any) -> list[str] | None:
    """Every id's token string (HF tokenizers and the GGUF tokenizer alike); None without one."""
    if tokenizer is None or not hasattr(tokenizer, "convert_ids_to_tokens"):
        return None
    return list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))


def build_speculator(engine: Any, target: Any, draft: str, num_draft: str | int, dtype: str = "auto",
                     device: str = "cpu", share_kv: bool = True) -> Speculator:
    """The speculator `infq run/bench --draft D --num-draft K` attach to `engine`: D = 'ngram' or
    a checkpoint the loader reads (refused unless it shares the target's tokenizer). `share_kv`:
    a draft laid out as the target takes the target's prompt K/V (`DraftModelProposer`)."""
    k = parse_num_draft(num_draft)
    if engine.config.static:
        raise InfqError("speculative decoding runs with continuous batching only; drop the static baseline")
    if draft == "ngram":
        return Speculator(NgramProposer(), k)
    from infq.runtime.loader import load_model

    loaded = load_model(draft, dtype=dtype, device=device, serving=True)
    check_draft(target, loaded, draft)
    shared = engine.kv if share_kv and shares_kv_layout(loaded.config, target.config) else None
    return Speculator(DraftModelProposer(loaded.model, engine.pool.num_blocks, engine.pool.block_size, draft,
                                         target_kv=shared), k)
