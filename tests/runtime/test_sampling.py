"""Sampling (`runtime/sampling.py`) against transformers' own logits processors (the oracle for the
order and semantics), and the engine's greedy decoding with a repetition penalty against
transformers' `generate(repetition_penalty=...)` on the demo model, token for token."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from infq.errors import InfqError
from infq.formats.hf import resolve_model
from infq.runtime.engine import Engine, EngineConfig
from infq.runtime.generate import eos_ids
from infq.runtime.loader import load_model
from infq.runtime.sampling import SamplingParams, penalize, probs


@pytest.mark.parametrize("temperature,top_k,top_p,min_p,penalty", [
    (1.0, 0, 1.0, 0.1, 1.0), (0.7, 50, 0.9, 0.05, 1.3), (1.3, 0, 0.95, 0.2, 0.8), (0.9, 20, 1.0, 0.0, 1.2)])
def test_distribution_equals_transformers_processors(temperature, top_k, top_p, min_p, penalty):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 300, generator=g)
    history = torch.randint(0, 300, (2, 40), generator=g)
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty)] if penalty != 1 else [])
    procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        procs.append(TopPLogitsWarper(top_p))
    if min_p:
        procs.append(MinPLogitsWarper(min_p))
    params = SamplingParams(temperature, top_k, top_p, None, min_p, penalty)
    for b in range(2):
        want = procs(history[b:b + 1], logits[b:b + 1].clone()).softmax(-1)
        got = probs(penalize(logits[b:b + 1], history[b].tolist(), penalty), params)
        assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
        assert ((got > 0) == (want > 0)).all()  # the same tokens kept


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_penalized_logits_equal_transformers(penalty):
    """Positive logits of seen tokens divided, negative ones multiplied (exactly), unseen ones unchanged."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 50, generator=g)
    history = torch.randint(0, 50, (1, 30), generator=g)
    want = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    got = penalize(logits, history[0].tolist(), penalty)
    assert torch.equal(got, want)
    assert (logits[0, history[0]] < 0).any() and (logits[0, history[0]] > 0).any() and not torch.equal(got, logits)


def test_min_p_keeps_tokens_near_the_top():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    p = probs(logits, SamplingParams(temperature=1.0, min_p=0.15))  # keep p >= 0.075
    assert (p[0] > 0).tolist() == [True, True, True, False, False]


def test_bad_values():
    with pytest.raises(InfqError, match="--min-p"):
        SamplingParams(min_p=1.5)
    with pytest.raises(InfqError, match="--repetition-penalty"):
        SamplingParams(repetition_penalty=0)


@pytest.mark.parametrize("penalty", [1.3, 0.9])
def test_greedy_with_repetition_penalty_equals_transformers(penalty):
    demo = load_model("demo")
    prompts = [demo.tokenizer(t).input_ids for t in ("def fibonacci(n):", "import os\nimport os\nimport")]
    hf = transformers.AutoModelForCausalLM.from_pretrained(resolve_model("demo"), dtype=torch.float32).eval()
    want = [hf.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, repetition_penalty=penalty,
                        pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    eng = Engine(demo.model, EngineConfig(block_size=8), eos_ids=eos_ids(demo), tokenizer=demo.tokenizer)
    outs = eng.generate(prompts, SamplingParams(repetition_penalty=penalty), max_tokens=20)
    assert [o.token_ids for o in outs] == want
    plain = Engine(demo.model, EngineConfig(block_size=8), eos_ids=eos_ids(demo)).generate(prompts, max_tokens=20)
    assert [o.token_ids for o in plain] != want  # the penalty changed the text


def test_logprobs_equal_transformers_forward():
    """`logprobs=k`: each output token's log-probability and the k most likely tokens equal the
    log-softmax of transformers' logits over prompt + outputs (teacher forced), within fp32 noise;
    also for forked parallel samples."""
    demo = load_model("demo")
    prompt = demo.tokenizer("def fibonacci(n):").input_ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(resolve_model("demo"), dtype=torch.float32).eval()
    eng = Engine(demo.model, EngineConfig(block_size=8), eos_ids=eos_ids(demo), tokenizer=demo.tokenizer)
    eng.add_request(prompt, SamplingParams(temperature=1.0, seed=3), 12, ignore_eos=True, request_id=0, n=2,
                    logprobs=3)
    outs = [o for step in eng.stream() for o in step if o.finished]
    assert len(outs) == 2
    for o in outs:
        assert len(o.logprobs) == len(o.token_ids) == 12
        with torch.no_grad():
            lp = hf(torch.tensor([prompt + o.token_ids])).logits[0, len(prompt) - 1:-1].log_softmax(-1)  # (12, V)
        for t, (tok, entry) in enumerate(zip(o.token_ids, o.logprobs, strict=True)):
            assert entry["token_id"] == tok
            assert abs(entry["logprob"] - lp[t, tok].item()) < 1e-4
            want = lp[t].topk(3)
            assert [i for i, _ in entry["top"]] == want.indices.tolist()
            assert max(abs(v - w) for (_, v), w in zip(entry["top"], want.values.tolist(), strict=True)) < 1e-4
    assert outs[0].token_ids != outs[1].token_ids
