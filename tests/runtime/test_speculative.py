"""Speculative decoding: the acceptance rule against an exact enumeration of its output
distribution, greedy outputs equal to the target alone (batched, unbatched, under budget cuts and
preemption), sampled outputs following the target's distribution (chi-square against transformers'
probabilities), no leaked KV blocks, and drafts with another vocabulary refused."""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tinymodels import make_tiny_model
from typer.testing import CliRunner

from infq.cli.app import app
from infq.errors import InfqError
from infq.runtime import speculative
from infq.runtime.engine import Engine, EngineConfig
from infq.runtime.loader import load_model
from infq.runtime.sampling import SamplingParams
from infq.runtime.speculative import (
    DraftModelProposer,
    NgramProposer,
    Speculator,
    build_speculator,
    check_draft,
    choose_k,
    expected_tokens,
    expected_tokens_at,
    lookup,
    verify_greedy,
    verify_sampled,
)


# -- the rule, exactly ------------------------------------------------------------------------------
class _PathRng:
    """Follows a script of branch choices and records every branch point it meets, so that all
    paths of a randomized function can be enumerated with their exact probabilities."""

    def __init__(self, script: list[int]) -> None:
        self.script, self.taken, self.options, self.weight = script, [], [], 1.0

    def _choose(self, weights: list[tuple[object, float]]):
        weights = [(v, w) for v, w in weights if w > 0]
        d = len(self.taken)
        pick = self.script[d] if d < len(self.script) else 0
        self.taken.append(pick)
        self.options.append(len(weights))
        self.weight *= weights[pick][1]
        return weights[pick][0]

    def bernoulli(self, prob: float) -> bool:
        return self._choose([(True, prob), (False, 1 - prob)])

    def categorical(self, p: torch.Tensor) -> int:
        return self._choose(list(enumerate(p.tolist())))


def exact_distribution(fn) -> dict[tuple, float]:
    dist: dict[tuple, float] = defaultdict(float)
    stack: list[list[int]] = [[]]
    while stack:
        script = stack.pop()
        rng = _PathRng(script)
        dist[tuple(fn(rng))] += rng.weight
        for depth in range(len(script), len(rng.taken)):
            stack.extend(rng.taken[:depth] + [alt] for alt in range(1, rng.options[depth]))
    return dist


def _rows(seed: int, k: int, v: int, zeros: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(k, v, generator=g, dtype=torch.float64) ** 3
    if zeros:  # truncated supports, as top-k / top-p leave them
        x[torch.rand(k, v, generator=g, dtype=torch.float64) < 0.3] = 0
        x[:, 0] += 0.05
    return x / x.sum(-1, keepdim=True)


def _completed(p, draft_fn, q):
    """Run the rule, then sample the positions it did not reach from p's rows: the completed
    sequence must be distributed as the product of p's rows, whatever the draft."""

    def fn(rng):
        draft = draft_fn(rng)
        out = verify_sampled(p, draft, q, rng)
        return out + [rng.categorical(p[i]) for i in range(len(out), p.shape[0])]

    return exact_distribution(fn)


def _max_error(p, dist) -> float:
    k1, v = p.shape
    err = 0.0
    for seq in itertools.product(range(v), repeat=k1):
        want = math.prod(float(p[i, t]) for i, t in enumerate(seq))
        err = max(err, abs(dist.get(seq, 0.0) - want))
    return err


@pytest.mark.parametrize("zeros", [False, True])
def test_acceptance_rule_gives_the_target_distribution_exactly(zeros):
    k, v = 3, 4
    p, q = _rows(0, k + 1, v, zeros), _rows(1, k, v, zeros)
    dist = _completed(p, lambda rng: [rng.categorical(q[i]) for i in range(k)], q)  # drafts sampled from q
    assert abs(sum(dist.values()) - 1) < 1e-12
    assert _max_error(p, dist) < 1e-12


def test_point_mass_drafts_give_the_target_distribution_exactly():
    p = _rows(2, 4, 4, True)
    for draft in ([0, 1, 2], [3, 3, 3], [1, 0, 0]):
        assert _max_error(p, _completed(p, lambda rng, d=draft: list(d), None)) < 1e-12


def test_the_exact_check_detects_a_wrong_rule(monkeypatch):
    """Resampling from p instead of the residual after a rejection skews the output: the check fails."""
    k, v = 2, 3
    p, q = _rows(3, k + 1, v, False), _rows(4, k, v, False)
    monkeypatch.setattr(speculative, "residual", lambda p_i, q_i, x: p_i)
    dist = _completed(p, lambda rng: [rng.categorical(q[i]) for i in range(k)], q)
    assert _max_error(p, dist) > 1e-3


def test_greedy_rule_lookup_and_auto_k():
    assert verify_greedy([5, 6, 7], [5, 6]) == [5, 6, 7]
    assert verify_greedy([5, 9, 7], [5, 6]) == [5, 9]
    assert verify_greedy([4, 6, 7], [5, 6]) == [4]
    assert lookup([1, 2, 3, 9, 1, 2, 3], 3, 3, 1) == [9, 1, 2]
    assert lookup([7, 1, 2, 8, 1, 2], 2, 3, 1) == [8, 1]  # the longest suffix that occurred before
    assert lookup([1, 2, 3], 2, 3, 1) == []
    assert expected_tokens(0.5, 3) == pytest.approx(1.875)
    assert expected_tokens(1.0, 3) == 4
    assert choose_k(0.95, 0.0) == 8 and choose_k(0.1, 0.5) == 0 and choose_k(0.8, 1.1) == 0
    best = max(range(1, 9), key=lambda kk: (1 - 0.7 ** (kk + 1)) / 0.3 / (1 + 0.2 * kk))
    assert choose_k(0.7, 0.2) == best


def test_auto_k_values_runs_of_acceptances():
    """Per-position conditional rates: equal rates give the i.i.d. formula; acceptances in runs
    (a first draft accepted 0.8 of the time, later ones 0.95 given the earlier ones were) make
    long drafts pay where the i.i.d. formula at the same overall rate stops early."""
    for k in range(6):
        assert expected_tokens_at([0.7], k) == pytest.approx(expected_tokens(0.7, k))
    rates = [0.8] + [0.95] * 7
    assert expected_tokens_at(rates, 3) == pytest.approx(1 + 0.8 + 0.8 * 0.95 + 0.8 * 0.95**2)
    # the overall acceptance rate of 8-token drafts under these rates (accepted / drafted)
    reach = [0.8 * 0.95**j for j in range(8)]
    overall = sum(reach) / 8
    assert choose_k(rates, 0.3) >= 6 and choose_k(overall, 0.3) <= 3


def test_auto_k_cost_model_skips_catch_up_passes(models):
    """The draft's per-token cost comes from its one-token passes: the first pass of a proposal,
    which also catches up on the tokens the draft has not seen (a new request's whole prompt),
    enters it only when it fed a single token."""
    target = load_model(str(models["target"]), serving=True)
    engine = Engine(target.model, EngineConfig(kv_memory=8 * 2**20))
    spec = build_speculator(engine, target, str(models["other"]), "auto", share_kv=False)
    engine.speculator = spec
    calls = []
    orig = spec.cost.draft

    def record(seconds: float, passes: int) -> None:
        calls.append((passes, list(spec.proposer.pass_seconds), spec.proposer.catch_up, seconds))
        orig(seconds, passes)

    spec.cost.draft = record
    engine.generate([list(range(3, 40))], max_tokens=12, ignore_eos=True)
    assert calls and calls[0][2] == 38  # the first proposal fed the prompt and the first generated token
    for passes, times, catch_up, seconds in calls:
        assert passes >= 1 and all(t > 0 for t in times)
        if catch_up > 1 or len(times) > 1:  # the first pass left out
            assert passes == len(times) - 1 and seconds == pytest.approx(sum(times[1:]))
        else:
            assert passes == 1 and seconds == pytest.approx(times[0])



# -- the engine ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spec")
    return {"target": make_tiny_model(root / "target", seed=0),
            "other": make_tiny_model(root / "other", seed=1),  # same vocabulary, unrelated weights
            "small-vocab": make_tiny_model(root / "small-vocab", seed=2, vocab_size=300)}


PROMPTS = [[1, 40, 41, 42, 43, 40, 41, 42, 43, 40, 41], [1, 100, 7, 9], [1, 5, 6, 5, 6, 5, 6, 5, 6, 5, 6, 5, 6, 5],
           [1, 200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212, 213, 214, 215, 216, 217, 218]]


def _speculator(kind, models, target, num_blocks, block_size, k):
    if kind == "ngram":
        return Speculator(NgramProposer(), k)
    draft = target if kind == "self" else load_model(str(models[kind]), tokenizer=False, device=str(target.device),
                                                      dtype="float32").model
    return Speculator(DraftModelProposer(draft, num_blocks, block_size), k)


def _check_pools(engine: Engine) -> None:
    """Every block referenced exactly by the live tables; no table longer than its computed tokens."""
    sched, pool = engine.scheduler, engine.pool
    pool.check([r.block_table for r in sched.running])
    for r in sched.running:
        assert len(r.block_table) == pool.blocks_needed(r.num_computed), "blocks past the computed tokens"
    proposer = engine.speculator.proposer
    if isinstance(proposer, DraftModelProposer):
        proposer.pool.check([s.table for s in proposer.seqs.values()])
        for s in proposer.seqs.values():
            assert len(s.table) == proposer.pool.blocks_needed(s.computed)


def _generate(engine: Engine, prompts, max_tokens, params=None, batched=True, check=False):
    ids = []
    batches = [prompts] if batched else [[p] for p in prompts]
    final = {}
    for batch in batches:
        ids += [engine.add_request(p, params, max_tokens, ignore_eos=True) for p in batch]
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out.token_ids
            if check:
                _check_pools(engine)
    return [final[i] for i in ids]


@pytest.mark.parametrize("kind", ["ngram", "self", "other"])
@pytest.mark.parametrize("batched", [True, False])
def test_greedy_outputs_equal_the_target_alone(models, kind, batched):
    target = load_model(str(models["target"]), tokenizer=False).model
    config = EngineConfig(kv_memory=2**20)
    plain = _generate(Engine(target, config), PROMPTS, 24, batched=batched)
    engine = Engine(target, config)
    engine.speculator = _speculator(kind, models, target, engine.pool.num_blocks, config.block_size, 4)
    assert _generate(engine, PROMPTS, 24, batched=batched, check=True) == plain
    stats = engine.speculator.report()
    assert stats["target_steps"] > 0
    if kind == "self":  # the draft is the target: every draft is accepted
        assert stats["acceptance_rate"] == 1.0 and stats["tokens_per_target_step"] > 4
    if kind == "other":
        assert stats["acceptance_rate"] < 0.9  # rejections and rollbacks happened
    assert engine.pool.num_free == engine.pool.num_blocks  # every block back in the pool
    if kind != "ngram":
        assert engine.speculator.proposer.pool.num_free == engine.speculator.proposer.pool.num_blocks


@pytest.mark.parametrize("kind", ["ngram", "other"])
def test_budget_cuts_preemption_and_auto_k_keep_greedy_outputs_and_leak_nothing(models, kind):
    """A 10-token step budget cuts drafts short and leaves proposals unscheduled; a 12-block pool
    (block size 4) preempts requests; K adapts per request. Outputs stay the target's."""
    target = load_model(str(models["target"]), tokenizer=False).model
    plain = _generate(Engine(target, EngineConfig(kv_memory=2**20)), PROMPTS * 2, 20)
    config = EngineConfig(block_size=4, kv_memory=12 * 2 * 2 * 4 * 2 * 16 * 4, max_num_batched_tokens=10)
    engine = Engine(target, config)
    assert engine.pool.num_blocks == 12
    engine.speculator = _speculator(kind, models, target, engine.pool.num_blocks, 4, None)
    assert _generate(engine, PROMPTS * 2, 20, check=True) == plain
    assert engine.scheduler.num_preemptions > 0
    assert engine.pool.num_free == engine.pool.num_blocks


def test_stop_token_inside_accepted_drafts_ends_the_request_there(models):
    target = load_model(str(models["target"]), tokenizer=False).model
    config = EngineConfig(kv_memory=2**20)
    ref = Engine(target, config).generate([PROMPTS[2]], max_tokens=12, ignore_eos=True)[0].token_ids
    stop = ref[5]
    want = ref[:ref.index(stop) + 1]
    for spec in (None, Speculator(NgramProposer(), 6), Speculator(DraftModelProposer(target, 64, 16), 6)):
        engine = Engine(target, config, speculator=spec)
        got = engine.generate([PROMPTS[2]], max_tokens=12, ignore_eos=True, stop_token_ids=[stop])[0]
        assert got.token_ids == want and got.finish_reason == "stop"


# -- sampled outputs follow the target ----------------------------------------------------------------
V, NEW, N_SAMPLES, ALPHA = 3, 4, 3000, 1e-3


def _peaked_model(path: Path, scale: float) -> Path:
    """A 1-layer model over 3 tokens with its lm_head scaled up, so its next-token distributions are
    far from uniform; a larger scale makes the same model an overconfident (bad) draft."""
    make_tiny_model(path, seed=0, vocab_size=V, num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                    bos_token_id=0, eos_token_id=1)
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * scale
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _exact_joint(path: Path, prompt: list[int]) -> dict[tuple, float]:
    """P(y1..y4 | prompt) from transformers' forward (the independent oracle)."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    joint = {(): 1.0}
    for _ in range(NEW):
        prefixes = list(joint)
        ids = torch.tensor([prompt + list(s) for s in prefixes])
        with torch.no_grad():
            p = ref(ids).logits[:, -1].softmax(-1)  # (n, V)
        joint = {s + (t,): joint[s] * float(p[i, t]) for i, s in enumerate(prefixes) for t in range(V)}
    return joint


def _chi_square_p(counts: dict, joint: dict, n: int) -> float:
    """Pearson chi-square p-value; cells expected below 5 are pooled into one."""
    stat, dof, pool_obs, pool_exp = 0.0, -1, 0, 0.0
    for cell, prob in joint.items():
        exp = n * prob
        if exp < 5:
            pool_obs, pool_exp = pool_obs + counts.get(cell, 0), pool_exp + exp
            continue
        stat += (counts.get(cell, 0) - exp) ** 2 / exp
        dof += 1
    if pool_exp > 0:
        stat += (pool_obs - pool_exp) ** 2 / pool_exp
        dof += 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    root = tmp_path_factory.mktemp("peaked")
    target_path, draft_path = _peaked_model(root / "t", 40), _peaked_model(root / "d", 200)
    return target_path, draft_path, _exact_joint(target_path, PEAKED_PROMPT), _exact_joint(draft_path, PEAKED_PROMPT)


PEAKED_PROMPT = [0, 2]


def _sampled_counts(target_path: Path, draft_path: Path | None) -> tuple[dict[tuple, int], dict]:
    target = load_model(str(target_path), tokenizer=False).model
    engine = Engine(target, EngineConfig(kv_memory=2**20, max_num_seqs=256))
    if draft_path is None:  # prompt lookup: point-mass drafts
        engine.speculator = Speculator(NgramProposer(), 3)
    else:
        draft = load_model(str(draft_path), tokenizer=False).model
        engine.speculator = Speculator(DraftModelProposer(draft, engine.pool.num_blocks, 16), 3)
    counts: dict[tuple, int] = defaultdict(int)
    for start in range(0, N_SAMPLES, 500):
        for out in _sample_batch(engine, PEAKED_PROMPT, start, 500):
            counts[tuple(out)] += 1
    assert engine.pool.num_free == engine.pool.num_blocks
    return counts, engine.speculator.report()


@pytest.mark.parametrize("proposer", ["model", "ngram"])
def test_sampled_outputs_follow_the_target_distribution(peaked, proposer):
    """3000 seeded samples of 4 tokens (3^4 = 81 cells) from the target with an overconfident draft
    model (the target's logits x5) or prompt lookup over the 2-token prompt (K = 3, clamped to the
    room left): chi-square against the exact joint from transformers, significance 1e-3. The model
    draft's samples also reject the draft's own joint, so the test tells the two apart."""
    target_path, draft_path, joint, draft_joint = peaked
    counts, stats = _sampled_counts(target_path, draft_path if proposer == "model" else None)
    assert stats["drafted_tokens"] > N_SAMPLES / 2, stats
    assert 0.05 < stats["acceptance_rate"] < 0.8, stats  # many rejections, many acceptances and bonus tokens
    assert _chi_square_p(counts, joint, N_SAMPLES) > ALPHA
    if proposer == "model":
        assert _chi_square_p(counts, draft_joint, N_SAMPLES) < 1e-6


def test_the_chi_square_test_detects_a_wrong_rule(peaked, monkeypatch):
    """Power: resampling from p instead of normalize(max(0, p - q)) after a rejection is rejected."""
    target_path, draft_path, joint, _ = peaked
    monkeypatch.setattr(speculative, "residual", lambda p_i, q_i, x: p_i)
    counts, _ = _sampled_counts(target_path, draft_path)
    assert _chi_square_p(counts, joint, N_SAMPLES) < 1e-6


def _sample_batch(engine: Engine, prompt: list[int], start: int, n: int) -> list[list[int]]:
    ids = [engine.add_request(prompt, SamplingParams(temperature=1.0, seed=start + i), NEW, ignore_eos=True)
           for i in range(n)]
    final = {}
    for outs in engine.stream():
        for out in outs:
            if out.finished:
                final[out.request_id] = out.token_ids
    return [final[i] for i in ids]


# -- refusals ---------------------------------------------------------------------------------------
def test_draft_with_another_vocabulary_is_refused(models):
    r = CliRunner().invoke(app, ["run", str(models["target"]), "--prompt", "hi", "--draft", str(models["small-vocab"])])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "vocabulary of 300 tokens, the target 320" in lines[0]


def test_draft_with_another_tokenizer_is_refused(models, tmp_path):
    other = tmp_path / "shuffled"
    make_tiny_model(other, seed=3)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(InfqError, match="different tokenizer"):
        check_draft(load_model(str(models["target"])), load_model(str(other)), str(other))


def test_bad_num_draft_and_static_batching_are_refused(models):
    for bad in ("0", "many"):
        r = CliRunner().invoke(app, ["run", str(models["target"]), "--prompt", "hi", "--draft", "ngram",
                                     "--num-draft", bad])
        assert r.exit_code == 2 and "--num-draft" in r.output
    target = load_model(str(models["target"]))
    with pytest.raises(InfqError, match="continuous batching"):
        speculative.build_speculator(Engine(target.model, EngineConfig(static=True, kv_memory=2**20)), target, "ngram", 4)


def test_cli_reports_acceptance_and_matches_plain(models):
    r = CliRunner().invoke(app, ["run", str(models["target"]), "--prompt", "abcabcabcabc", "--draft",
                                 str(models["target"]), "--num-draft", "auto", "--max-new-tokens", "12", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.splitlines()[0])
    assert res["acceptance_rate"] == 1.0 and res["tokens_per_target_step"] > 1 and res["matches_plain"] is True
    assert res["speedup"] > 0 and res["num_draft"] == "auto"


def test_bf16_draft_for_an_fp32_target_keeps_greedy_output(models):
    r = CliRunner().invoke(app, ["run", str(models["target"]), "--prompt", "abcabcabcabc", "--draft",
                                 str(models["target"]), "--draft-dtype", "bfloat16", "--max-new-tokens", "16", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.splitlines()[0])
    assert res["matches_plain"] is True and res["acceptance_rate"] > 0.5


def test_bench_draft_reports_rows_and_pooled_figures(models):
    r = CliRunner().invoke(app, ["bench", str(models["target"]), "--draft", "ngram", "--num-draft", "3",
                                 "--gen-len", "8", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.splitlines()[-1])
    assert [(row["prompt_set"], row["batched"]) for row in res["rows"]] == [("code", False), ("code", True)]
    assert res["matches_plain"] is True and res["speedup"] > 0
    drafted = sum(row["drafted_tokens"] for row in res["rows"])
    assert res["acceptance_rate"] == pytest.approx(sum(row["accepted_tokens"] for row in res["rows"]) / drafted)
    for row in res["rows"]:
        assert row["generated_tokens"] == 8 * 8 and 1 <= row["tokens_per_target_step"] <= 4


def test_incremental_ngram_index_equals_the_scan():
    """The proposer's index, fed a sequence as it grows, proposes what a full backwards scan does."""
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        tokens = torch.randint(0, 2 + trial % 5, (120,), generator=g).tolist()
        proposer = NgramProposer(max_n=3, min_n=1 + trial % 2)
        for end in range(1, len(tokens), 1 + trial % 4):
            req = speculative.Request(0, tokens[:1], 200, token_ids=tokens[:end])
            got = proposer.propose([req], [4], [(SamplingParams(), None)])[0].tokens
            assert got == lookup(tokens[:end], 4, 3, 1 + trial % 2), (trial, end)


class _Clock:
    """speculative's clock: real time plus whatever a slow draft says it spent, so the cost ratio a
    test sees does not depend on how busy the machine is."""

    def __init__(self) -> None:
        import time

        self.real, self.offset = time.perf_counter, 0.0

    def perf_counter(self) -> float:
        return self.real() + self.offset


class _SlowDraft(DraftModelProposer):
    """The target as its own draft, made 10 s slower per pass on `clock` (no real sleep)."""

    clock: _Clock

    def _forward(self, feeds, seqs):
        self.clock.offset += 10.0
        return super()._forward(feeds, seqs)


class _Oracle(NgramProposer):
    """Proposes the target's own greedy continuation (known in advance) at no cost."""

    name = "oracle"

    def __init__(self, prompt: list[int], answer: list[int]) -> None:
        super().__init__()
        self.full = prompt + answer

    def propose(self, reqs, ks, sampling):
        return [speculative.Proposal(self.full[r.num_tokens:r.num_tokens + k]) for r, k in zip(reqs, ks, strict=True)]


def test_auto_k_follows_the_measured_costs(models, monkeypatch):
    """num_draft auto: a free, always-right draft drafts long (K = 8 bar the room left); a draft far
    costlier than a target step stops drafting after the first step's measurements, bar probes."""
    target = load_model(str(models["target"]), tokenizer=False).model
    config = EngineConfig(kv_memory=2**20)
    answer = Engine(target, config).generate([PROMPTS[1]], max_tokens=40, ignore_eos=True)[0].token_ids
    cheap = Engine(target, config, speculator=Speculator(_Oracle(PROMPTS[1], answer), None))
    assert cheap.generate([PROMPTS[1]], max_tokens=40, ignore_eos=True)[0].token_ids == answer
    rep = cheap.speculator.report()
    assert rep["acceptance_rate"] == 1.0 and rep["mean_num_draft"] > 6
    slow = Engine(target, config)
    clock = _Clock()
    monkeypatch.setattr(speculative, "time", clock)  # speculative only calls time.perf_counter
    draft = _SlowDraft(target, slow.pool.num_blocks, 16)
    draft.clock = clock
    slow.speculator = Speculator(draft, None)
    slow.generate([PROMPTS[0]], max_tokens=40, ignore_eos=True)
    rep = slow.speculator.report()
    assert rep["acceptance_rate"] == 1.0
    # K = 8 before any timing; then speculation does not pay (K = 0) but for a one-token probe
    # every PROBE_EVERY steps
    assert 1 <= rep["drafted_tokens"] - 8 <= (slow.steps - 1) // speculative.PROBE_EVERY + 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_greedy_equals_target_and_sampling_runs(models):
    """fp32 on the GPU (exact greedy equality holds in fp32); sampled drafts and verification use the
    requests' CPU generators."""
    target = load_model(str(models["target"]), device="cuda", dtype="float32", tokenizer=False).model
    config = EngineConfig(kv_memory=2**20)
    plain = _generate(Engine(target, config), PROMPTS, 16)
    engine = Engine(target, config)
    engine.speculator = _speculator("other", models, target, engine.pool.num_blocks, 16, 3)
    assert _generate(engine, PROMPTS, 16, check=True) == plain
    sampled = _generate(engine, PROMPTS, 16, SamplingParams(temperature=1.0, top_p=0.9, seed=1))
    assert all(len(s) == 16 for s in sampled)
    assert engine.pool.num_free == engine.pool.num_blocks


@given(st.data())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_workloads_keep_greedy_outputs_and_leak_nothing(models, data):
    """Random prompts, output lengths, block sizes, pool sizes, step budgets, K and proposers: the
    outputs are the target's, every step leaves the pools consistent, and everything is freed."""
    target = _load_cached(str(models["target"]))
    draft = _load_cached(str(models["other"]))
    prompts = data.draw(st.lists(st.lists(st.integers(3, 319), min_size=1, max_size=12), min_size=1, max_size=5))
    prompts = [[1] + p + p[: len(p) // 2] for p in prompts]  # repeats, so lookups find matches
    max_tokens = data.draw(st.integers(1, 10))
    block_size = data.draw(st.sampled_from([2, 4]))
    need = max(len(p) for p in prompts) + max_tokens
    num_blocks = data.draw(st.integers(-(-need // block_size) + 1, 40))
    config = EngineConfig(block_size=block_size, kv_memory=num_blocks * 2 * 2 * block_size * 2 * 16 * 4,
                          max_num_batched_tokens=data.draw(st.integers(4, 24)))
    plain = _generate(Engine(target, EngineConfig(kv_memory=2**20)), prompts, max_tokens)
    engine = Engine(target, config)
    assert engine.pool.num_blocks == num_blocks
    k = data.draw(st.sampled_from([1, 2, 5, None]))
    proposer = data.draw(st.sampled_from(["ngram", "model"]))
    engine.speculator = Speculator(NgramProposer() if proposer == "ngram" else
                                   DraftModelProposer(draft, data.draw(st.integers(2, 40)), block_size), k)
    assert _generate(engine, prompts, max_tokens, check=True) == plain
    assert engine.pool.num_free == engine.pool.num_blocks
    if proposer == "model":
        assert engine.speculator.proposer.pool.num_free == engine.speculator.proposer.pool.num_blocks


_LOADED: dict[str, object] = {}


def _load_cached(path: str):
    if path not in _LOADED:
        _LOADED[path] = load_model(path, tokenizer=False).model
    return _LOADED[path]


def test_divergences_name_the_first_differing_token_and_its_logit_gap():
    from infq.eval.spec_bench import divergences

    seen = []

    def model(ids: torch.Tensor) -> torch.Tensor:  # (1, T) -> (1, T, V): fixed last-position logits
        seen.append(ids[0].tolist())
        logits = torch.zeros(1, ids.shape[1], 5)
        logits[0, -1] = torch.tensor([0.0, 1.0, 0.75, 0.0, -2.0])
        return logits

    out = divergences(model, [[1, 2], [3]], [[4, 1, 1], [2, 2]], [[4, 2, 1], [2, 2]])
    assert seen == [[1, 2, 4]]  # only the differing prompt, up to the common prefix
    assert out == [{"prompt": 0, "position": 1, "plain_token": 1, "speculative_token": 2,
                    "logit_gap": 0.25, "top_logit": 1.0}]


# -- the draft reads the target's prompt K/V -------------------------------------------------------
def test_shared_prompt_kv_equals_the_drafts_own_prefill(models):
    """The target as its own draft (float32): the prompt K/V copied from the target's cache equal,
    within float32 rounding, what the draft's own prefill writes (oracle: that prefill); with them
    the draft proposes the target's own greedy continuation (acceptance 1.0), the output equals
    plain decoding, batched and not, and no block of either pool leaks."""
    target = load_model(str(models["target"]), tokenizer=False).model
    config = EngineConfig(kv_memory=2**20)
    plain = _generate(Engine(target, config), PROMPTS, 12)
    caches = {}
    for share in (False, True):
        engine = Engine(target, config)
        proposer = DraftModelProposer(target, engine.pool.num_blocks, 16, target_kv=engine.kv if share else None)
        engine.speculator = Speculator(proposer, 3)
        assert (proposer.target_kv is not None) == share
        engine.add_request(PROMPTS[3], None, 10, ignore_eos=True)
        engine.step()  # the target's prefill
        engine.step()  # the first proposal: the draft's prefill, or the copy
        seq = next(iter(proposer.seqs.values()))
        n = len(PROMPTS[3])
        caches[share] = [torch.cat([t[b] for b in seq.table])[:n] for t in proposer.kv.k + proposer.kv.v]
        while engine.has_unfinished():
            engine.step()
        assert engine.speculator.report()["acceptance_rate"] == 1.0
        for batched in (False, True):
            assert _generate(engine, PROMPTS, 12, batched=batched, check=True) == plain
        assert engine.speculator.report()["acceptance_rate"] == 1.0
        assert engine.pool.num_free == engine.pool.num_blocks and proposer.pool.num_free == proposer.pool.num_blocks
    for own, copied in zip(caches[False], caches[True], strict=True):
        torch.testing.assert_close(copied, own, rtol=1e-5, atol=1e-5)


def test_shared_prompt_kv_only_where_the_layouts_match(models, tmp_path):
    """build_speculator shares the target's K/V with a draft of the same layout (a quantized copy,
    here an unrelated model of the same shape), not with one of another depth, nor from a
    quantized (int8) target cache; outputs equal plain decoding either way."""
    from infq.runtime.speculative import shares_kv_layout

    target = load_model(str(models["target"]), serving=True)
    shallow = make_tiny_model(tmp_path / "shallow", seed=3, num_hidden_layers=1)
    assert not shares_kv_layout(load_model(str(shallow), tokenizer=False).config, target.config)
    for draft, kv_dtype, shared in ((models["other"], "auto", True), (shallow, "auto", False),
                                    (models["other"], "int8", False)):
        config = EngineConfig(kv_memory=2**20, kv_dtype=kv_dtype)
        plain = _generate(Engine(target.model, config), PROMPTS, 10)
        engine = Engine(target.model, config)
        engine.speculator = build_speculator(engine, target, str(draft), "3")
        assert (engine.speculator.proposer.target_kv is not None) == shared
        assert _generate(engine, PROMPTS, 10, check=True) == plain
