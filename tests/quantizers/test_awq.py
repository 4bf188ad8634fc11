"""AWQ: scale folding is exact in full precision, the search never loses to no scaling, the clip
search never loses to no clipping, and the whole method writes checkpoints whose function is the
original model's (tested at 8 bits against transformers' own logits)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tinymodels import make_tiny_model

from infq.formats.hf import Checkpoint, read_config
from infq.quantizers.api import QuantizeRequest, quantize_model
from infq.quantizers.awq import (
    AwqBlock,
    _module_loss,
    active_pairs,
    apply_clip,
    apply_scales,
    awq_block,
    block_features,
    fake_quant,
    output_error,
    search_clip,
    search_pair,
)
from infq.quantizers.calibrate import LayerStats
from infq.quantizers.scheme import QuantConfig
from infq.runtime.arch import ModelConfig
from infq.runtime.linear import DenseLinear
from infq.runtime.loader import HFWeights, load_model
from infq.runtime.model import Block, Rope, build_block

T = 16
CONFIG = QuantConfig(method="awq", bits=4, group_size=32, sym=False)


def _block(tmp_path, family="llama", **kw):
    path = make_tiny_model(tmp_path / family, family=family, **kw)
    cfg = ModelConfig.from_hf(read_config(path))
    block = build_block(cfg, HFWeights(Checkpoint(path)), 0, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, T, cfg.hidden_size, generator=g)
    h[..., 3] *= 20  # one salient channel, as real activations have
    rope = Rope(cfg)(torch.arange(T).expand(2, -1), torch.float32)
    return block, h, rope


def _rebuilt(block: Block, weights, biases, norms) -> Block:
    lin = {r: DenseLinear(weights[r], biases[r]) for r in weights}
    return Block(block.cfg, block.index, lin, norms)


def _forward(block: Block, h, rope):
    cos, sin = rope
    return torch.cat([block(h[s : s + 2], cos, sin) for s in range(0, h.shape[0], 2)])


@pytest.mark.parametrize(("family", "kw"), [("llama", {}), ("qwen2", {"num_key_value_heads": 4})])
def test_scale_folding_keeps_the_full_precision_function(tmp_path, family, kw):
    """Random positive scales on every pair (incl. v -> o with a v bias under MHA): same outputs."""
    block, h, rope = _block(tmp_path, family, **kw)
    pairs = active_pairs(block, CONFIG, lambda r: r)
    assert [p.prev for p in pairs] == (["input_norm", "v", "post_norm", "up"] if kw else ["input_norm", "post_norm", "up"])
    g = torch.Generator().manual_seed(1)
    from infq.quantizers.awq import PairScale

    scales = [PairScale(p.prev, p.linears, torch.rand(block.linears[p.linears[0]].in_features, generator=g) * 4 + 0.1,
                        0.5, False, 0.0, 0.0) for p in pairs]
    weights = {r: m.weight.float() for r, m in block.linears.items()}
    biases = {r: (None if m.bias is None else m.bias.float()) for r, m in block.linears.items()}
    norms = {"input_norm": block.input_norm.data, "post_norm": block.post_norm.data}
    w2, b2, n2 = apply_scales(weights, biases, norms, scales)
    assert all(torch.equal(weights[r], block.linears[r].weight) for r in weights)  # inputs untouched
    ref = _forward(block, h, rope)
    got = _forward(_rebuilt(block, w2, b2, n2), h, rope)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_search_never_worse_than_no_scaling(tmp_path):
    block, h, rope = _block(tmp_path, hidden_size=128, intermediate_size=256)
    pairs = active_pairs(block, CONFIG, lambda r: r)
    feats = block_features(block, h, rope, 2, tuple(p.linears[0] for p in pairs))
    for pair in pairs:
        x = feats[pair.linears[0]]
        st = LayerStats(x.shape[1])
        st.add_batch(x, frozenset({"absmean"}))
        ps = search_pair(block, pair, x, st.finish().absmean, T, rope, 2, CONFIG)
        loss = _module_loss(block, pair, x, T, rope, 2)
        plain = loss({r: fake_quant(block.linears[r].weight.float(), CONFIG) for r in pair.linears})
        chosen = loss({r: fake_quant(block.linears[r].weight.float() * ps.scales, CONFIG) / ps.scales for r in pair.linears})
        assert ps.loss_before == pytest.approx(plain, rel=1e-9)
        assert chosen == pytest.approx(ps.loss_after, rel=1e-9) and chosen <= plain
    # and the whole block: AWQ's tensors, fake-quantized, beat plain min-max RTN on the block output
    new = awq_block(block, h, rope, 2, CONFIG, lambda r: r)
    weights = {r: m.weight.float() for r, m in block.linears.items()}
    plain = AwqBlock([], {}, weights, {r: None for r in weights},
                     {"input_norm": block.input_norm.data, "post_norm": block.post_norm.data}, {})
    assert output_error(block, new, h, rope, 2, CONFIG) < output_error(block, plain, h, rope, 2, CONFIG)
    assert output_error(block, new, h, rope, 2, CONFIG, quantize=False) > 0  # clipping changed weights


def test_linear_pair_loss_equals_forward_mse(tmp_path):
    """The Gram-matrix form of a lone linear's output MSE against a float64 forward."""
    block, h, rope = _block(tmp_path, hidden_size=128, intermediate_size=256)
    pair = next(p for p in active_pairs(block, CONFIG, lambda r: r) if p.prev == "up")
    x = block_features(block, h, rope, 2, ("down",))["down"]
    w = block.linears["down"].weight.float()
    trial = {"down": fake_quant(w, CONFIG)}
    expected = (x.double() @ (trial["down"] - w).double().T).pow(2).mean().item()
    assert _module_loss(block, pair, x, T, rope, 2)(trial) == pytest.approx(expected, rel=1e-5)


def test_clip_search_never_worse_than_no_clipping():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    w[:, 5] *= 8  # outliers that clipping should trade away
    x = torch.randn(700, 64, generator=g)
    bound = search_clip(w, x, CONFIG)
    assert bound.shape == (48, 2)
    m0 = w.reshape(48, 2, 32).abs().amax(-1)
    assert bool((bound <= m0).all()) and bool((bound >= 0.55 * m0 - 1e-6).all())

    def err(wq):  # the search's own criterion on its token sub-sample, per (row, group)
        xs = x[:: max(1, x.shape[0] // 512)][:512].reshape(-1, 2, 32)
        d = (wq - w).reshape(48, 2, 32)
        return torch.einsum("tgk,ogk->tog", xs, d).pow(2).mean(0)

    assert bool((err(fake_quant(apply_clip(w, bound), CONFIG)) <= err(fake_quant(w, CONFIG)) + 1e-7).all())


def test_awq_checkpoint_keeps_the_model_function(tmp_path):
    """8-bit AWQ written as GPTQ v2: scaled norms and linears in the file reproduce transformers'
    logits of the original model within 8-bit error; 4-bit AWQ GEMM output loads and records the
    search in the JSON."""
    src = make_tiny_model(tmp_path / "src", hidden_size=128, intermediate_size=256)
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"line {i}: the quick brown fox {i % 7} jumps over {i % 13} lazy dogs" for i in range(400)))
    base = dict(model=str(src), method="awq", group_size=32, dataset=str(text), nsamples=8, seqlen=64)
    res = quantize_model(QuantizeRequest(**base, bits=8, format="gptq", out=str(tmp_path / "a8")))
    assert res["format"] == "gptq" and res["checkpoint_format"] == "gptq_v2" and res["sym"] is False
    qc = json.loads((tmp_path / "a8" / "config.json").read_text())["quantization_config"]
    assert qc["meta"]["infq_method"] == "awq"
    ckpt, orig = Checkpoint(tmp_path / "a8"), Checkpoint(src)
    norms = [n for n in orig.keys() if "layernorm" in n]
    assert any(not torch.equal(ckpt.get(n), orig.get(n)) for n in norms)  # scales were folded into norms
    ids = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(2))
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(ids).logits
    got = load_model(str(tmp_path / "a8"), tokenizer=False).model(ids)
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    res4 = quantize_model(QuantizeRequest(**base, bits=4, out=str(tmp_path / "a4")))
    assert res4["format"] == "awq"
    assert json.loads((tmp_path / "a4" / "config.json").read_text())["quantization_config"]["version"] == "gemm"
    got4 = load_model(str(tmp_path / "a4"), tokenizer=False).model(ids)
    assert torch.isfinite(got4).all()
