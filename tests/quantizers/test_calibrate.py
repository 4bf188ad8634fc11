"""The calibration driver: statistics equal those computed on transformers' own activations."""

from __future__ import annotations

import torch
import transformers
from tinymodels import make_tiny_model

from infq.formats.hf import Checkpoint
from infq.quantizers.calibrate import CalibrationContext, LayerStats, calibrate
from infq.quantizers.rtn import quantize_rtn
from infq.quantizers.scheme import QuantConfig
from infq.runtime.arch import ModelConfig
from infq.runtime.loader import HFWeights


def _inputs_seen_by_transformers(path, windows, module_names):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seen = {n: [] for n in module_names}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1]))) for n in module_names]
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


def test_first_block_statistics_match_transformers(tmp_path):
    path = make_tiny_model(tmp_path / "m")
    cfg = ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(path).to_dict())
    windows = torch.randint(3, 320, (6, 24), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.0.self_attn.q_proj"]
    xs = _inputs_seen_by_transformers(path, windows, names)
    captured: dict[str, LayerStats] = {}

    def recording_rtn(weight, stats, config):
        captured[len(captured)] = stats
        return quantize_rtn(weight, config), {}

    # Method "gptq" makes the driver collect Hessians; q/k/v (the first group) see exact inputs.
    config = QuantConfig(method="gptq", bits=8, group_size=-1)
    ctx = CalibrationContext(cfg, HFWeights(Checkpoint(path)), config, recording_rtn, batch_tokens=4 * 24)
    next(calibrate(ctx, windows))
    q_stats = captured[0]
    x = xs[names[0]]
    expected_h = 2 * x.T @ x / x.shape[0]
    assert q_stats.tokens == 6 * 24
    assert q_stats.hessian.dtype == torch.float32
    assert torch.allclose(q_stats.hessian.double(), expected_h, rtol=1e-5, atol=1e-6)


def test_absmean_sqmean_amax(tmp_path):
    stats = LayerStats(3)
    x = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 4.0, 0.0]])
    need = frozenset({"absmean", "sqmean", "amax", "hessian"})
    stats.add_batch(x[:1], need)
    stats.add_batch(x[1:], need)
    stats.finish()
    assert torch.allclose(stats.absmean, torch.tensor([2.0, 3.0, 0.25]))
    assert torch.allclose(stats.sqmean, torch.tensor([5.0, 10.0, 0.125]))
    assert float(stats.amax) == 4.0
    assert torch.allclose(stats.hessian.double(), (2 * x.T.double() @ x.double()) / 2)


def test_statistics_do_not_depend_on_mlp_slicing_or_spilling(tmp_path, monkeypatch):
    """The statistics passes run the MLP a few tokens at a time (and park the activations on disk
    while large Hessians are solved): every group's Hessian, and the quantized result, equal a run
    with the MLP in one piece and nothing parked."""
    import infq.quantizers.calibrate as calibrate_module

    path = make_tiny_model(tmp_path / "m")
    cfg = ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(path).to_dict())
    windows = torch.randint(3, 320, (6, 24), generator=torch.Generator().manual_seed(1))

    def run(mlp_tokens: int, spill: bool) -> tuple[list[torch.Tensor], dict]:
        monkeypatch.setattr(calibrate_module, "OBSERVE_MLP_TOKENS", mlp_tokens)
        monkeypatch.setattr(calibrate_module, "SPILL_HESSIAN_BYTES", 0 if spill else 1 << 62)
        hessians: list[torch.Tensor] = []

        def recording_rtn(weight, stats, config):
            hessians.append(stats.hessian.clone())
            return quantize_rtn(weight, config), {}

        config = QuantConfig(method="gptq", bits=4, group_size=16)
        ctx = CalibrationContext(cfg, HFWeights(Checkpoint(path)), config, recording_rtn, batch_tokens=4 * 24,
                                 spill_dir=tmp_path if spill else None)
        codes = {n: qt.codes for r in calibrate(ctx, windows) for n, qt in r.tensors.items()}
        return hessians, codes

    whole, codes_whole = run(1 << 30, spill=False)
    sliced, codes_sliced = run(7, spill=True)  # 96-token chunks: 13 slices of 7 and one of 5
    assert len(whole) == len(sliced) == cfg.num_layers * 7
    for a, b in zip(whole, sliced, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert codes_whole.keys() == codes_sliced.keys()
    same = sum(int((codes_whole[n] == codes_sliced[n]).sum()) for n in codes_whole)
    total = sum(c.numel() for c in codes_whole.values())
    assert same / total > 0.999  # float summation order differs between slicings; codes agree
    assert list(tmp_path.glob("tmp*")) == []  # the parked activations left no file behind
