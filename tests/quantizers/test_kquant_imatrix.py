"""The kquant importance matrix collected by the shared driver equals a float64 oracle computed from
transformers' own forward (pre-hooks on every linear, mean of x^2 per input column), in every layer:
the driver runs the full-precision model, as llama-imatrix does, so no quantization error reaches
later layers. Tolerance: rtol 1e-4 (both forwards in float32; the oracle accumulates in float64)."""

from __future__ import annotations

import torch
import transformers
from tinymodels import make_tiny_model

from infq.formats.hf import Checkpoint
from infq.quantizers.api import method_fn
from infq.quantizers.calibrate import CalibrationContext, collect_stats
from infq.quantizers.kquants import quantize_kquant
from infq.quantizers.scheme import QuantConfig
from infq.runtime.arch import ModelConfig
from infq.runtime.loader import HFWeights


def _oracle(path, windows, names):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    sums = dict.fromkeys(names, 0.0)
    counts = dict.fromkeys(names, 0)
    mods = dict(model.named_modules())

    def hook(name):
        def f(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()  # (tokens, in)
            sums[name] = sums[name] + (x * x).sum(0)
            counts[name] += x.shape[0]
        return f

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        model(windows)
    for h in handles:
        h.remove()
    return {n: sums[n] / counts[n] for n in names}, counts


def test_driver_imatrix_equals_float64_hooks(tmp_path):
    path = make_tiny_model(tmp_path / "m", num_hidden_layers=3)
    cfg = ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(path).to_dict())
    windows = torch.randint(3, 320, (5, 40), generator=torch.Generator().manual_seed(1))
    config = QuantConfig(method="kquant", bits=4, group_size=-1)
    # batch_tokens 80: the 5 windows run in chunks of 2, so accumulation across chunks is exercised
    ctx = CalibrationContext(cfg, HFWeights(Checkpoint(path)), config, method_fn("kquant"), batch_tokens=80)
    got = {}
    for i, stats in collect_stats(ctx, windows):
        assert set(stats) == {cfg.arch.linear_name(i, r) for r in cfg.arch.linears}
        got.update(stats)
    want, counts = _oracle(path, windows, sorted(got))
    for name, st in got.items():
        assert st.tokens == counts[name] == 5 * 40
        assert st.sqmean.dtype == torch.float32 and st.hessian is None
        assert torch.allclose(st.sqmean.double(), want[name], rtol=1e-4, atol=1e-9), name


def test_kquant_pure_function_uses_the_imatrix(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(8, 256)
    cfg = QuantConfig(method="kquant", bits=4, group_size=-1)
    from infq.quantizers.calibrate import LayerStats

    st = LayerStats(256)
    st.sqmean = torch.rand(256) ** 4  # strongly uneven importance
    plain = quantize_kquant(w, LayerStats(256), cfg)
    weighted = quantize_kquant(w, st, cfg)
    assert plain.scheme.kind == "gguf:Q4_K" and quantize_kquant(w, st, cfg, "Q6_K").scheme.kind == "gguf:Q6_K"

    def err(qt):
        return float((st.sqmean * (qt.dequantize() - w) ** 2).sum())

    assert err(weighted) < err(plain)  # the imatrix fit lowers the importance-weighted error
