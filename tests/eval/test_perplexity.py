"""Perplexity protocols against independent computations on transformers' logits."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from tinymodels import make_tiny_model

from infq.errors import InfqError
from infq.eval.perplexity import perplexity
from infq.runtime.loader import load_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("ppl") / "m")
    ours = load_model(str(path), tokenizer=False).model
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = torch.randint(3, 320, (1000,), generator=torch.Generator().manual_seed(0))
    return ours, ref, tokens


def test_uniform_model_scores_vocab_size(tmp_path):
    # Zero the head: every logit equal, so each prediction has probability 1/V and ppl == V.
    path = make_tiny_model(tmp_path / "u")
    model = load_model(str(path), tokenizer=False).model
    model.lm_head.weight.data.zero_()
    tokens = torch.randint(3, 320, (600,), generator=torch.Generator().manual_seed(3))
    for protocol in ("gptq", "llamacpp"):
        r = perplexity(model, tokens, seqlen=64, protocol=protocol, bos_id=1)
        assert r.ppl == pytest.approx(320, rel=1e-5), protocol


def test_gptq_protocol_matches_paper_loop(setup):
    ours, ref, tokens = setup
    seqlen, nlls = 128, []
    n = tokens.numel() // seqlen  # 7 windows, tail dropped
    with torch.no_grad():
        for i in range(n):
            ids = tokens[i * seqlen : (i + 1) * seqlen][None]
            logits = ref(ids).logits.double()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
            nlls.append(float(loss) * seqlen)
    expected = math.exp(sum(nlls) / (n * seqlen))
    r = perplexity(ours, tokens, seqlen=seqlen, protocol="gptq")
    assert r.windows == n and r.tokens == n * seqlen
    assert r.ppl == pytest.approx(expected, rel=1e-5)


def test_llamacpp_protocol_scores_second_half_with_bos(setup):
    ours, ref, tokens = setup
    ctx, bos, nll = 100, 1, []
    with torch.no_grad():
        for i in range(tokens.numel() // ctx):
            ids = tokens[i * ctx : (i + 1) * ctx].clone()[None]
            ids[0, 0] = bos
            logp = ref(ids).logits.double().log_softmax(-1)[0]
            for j in range(ctx // 2, ctx - 1):  # logit at j predicts token j+1
                nll.append(-float(logp[j, ids[0, j + 1]]))
    expected = math.exp(sum(nll) / len(nll))
    r = perplexity(ours, tokens, seqlen=ctx, protocol="llamacpp", bos_id=bos)
    assert r.scored == len(nll) == 10 * 49
    assert r.ppl == pytest.approx(expected, rel=1e-5)
    assert r.stderr > 0


def test_limit_and_too_short(setup):
    ours, _, tokens = setup
    assert perplexity(ours, tokens, seqlen=100, limit=3).windows == 3
    with pytest.raises(InfqError, match="at least 2000"):
        perplexity(ours, tokens, seqlen=2000)
