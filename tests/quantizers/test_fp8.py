"""FP8 quantizer: e4m3 codes against a bit-level oracle, scales, the e4m3 rounding bound, saturation,
static input scales equal to the amax of what is fed (directly and through the calibration driver,
against transformers' own activations), percentiles, and one-line refusals."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from peer_layouts import e4m3_value

from infq.errors import InfqError
from infq.quantizers.calibrate import LayerStats
from infq.quantizers.fp8 import E4M3_MAX, percentile_amax, quantize_fp8, to_e4m3
from infq.quantizers.scheme import QuantConfig

BYTE_OF = {v: b for b in reversed(range(256)) if not math.isnan(v := e4m3_value(b))}  # value -> byte (+0 for 0)
GRID = sorted(BYTE_OF)  # every finite e4m3 value


def _nearest_even(v: float) -> float:
    """Python oracle of round-to-nearest-even onto the e4m3 grid, after saturation to ±448."""
    v = max(-E4M3_MAX, min(E4M3_MAX, v))
    d = min(abs(g - v) for g in GRID)
    ties = [g for g in GRID if abs(g - v) == d]
    return ties[0] if len(ties) == 1 else next(g for g in ties if BYTE_OF[g] % 2 == 0)


def _ceil(q: float, dtype: type) -> float:
    """Smallest value of a numpy float type >= the Python float q."""
    v = dtype(q)
    return float(v if float(v) >= q else np.nextafter(v, dtype(np.inf)))


def test_e4m3_bytes_decode_as_the_spec_says() -> None:
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    for b in range(256):
        expected = e4m3_value(b)
        assert (math.isnan(expected) and math.isnan(codes[b])) or codes[b].item() == expected, b
    assert max(GRID) == E4M3_MAX and len(GRID) == 253  # ±0 collapse; two NaNs dropped


def test_to_e4m3_rounds_to_nearest_even_and_saturates() -> None:
    rng = random.Random(0)
    values = [rng.uniform(-500, 500) for _ in range(300)] + [rng.uniform(-0.02, 0.02) for _ in range(300)]
    values += [g + (h - g) / 2 for g, h in zip(GRID, GRID[1:], strict=False)]  # exact midpoints: ties
    values += [1e6, -1e6, 464.0, 449.0, -449.0]
    x = torch.tensor(values, dtype=torch.float32)  # the oracle rounds the same float32 values
    assert to_e4m3(x).float().tolist() == [_nearest_even(v) for v in x.tolist()]
    assert to_e4m3(torch.tensor([float("inf"), -1e30])).float().tolist() == [448.0, -448.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight_scale", ["tensor", "channel"])
def test_codes_scales_and_rounding_bound(dtype: torch.dtype, weight_scale: str) -> None:
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(48, 96, generator=g) * torch.logspace(-4, 1, 48)[:, None]).to(dtype)  # rows over 5 decades
    w[3] = 0  # an all-zero row
    w[5, 7] = 40.0  # an outlier
    config = QuantConfig(method="fp8", bits=8, group_size=-1, weight_scale=weight_scale, act_scheme="none")
    qt, _ = quantize_fp8(w, LayerStats(96), config)
    assert qt.codes.dtype == torch.float8_e4m3fn and qt.scales.dtype == dtype and qt.scales.shape == (48, 1)
    assert qt.input_scale is None and qt.scheme.kind == "fp8"
    w64 = w.double()
    amax = w64.abs().amax(1, keepdim=True) if weight_scale == "channel" else w64.abs().max().expand(48, 1)
    s = qt.scales.double()
    assert (s > 0).all() and ((s.numel() == 1) or weight_scale == "channel" or (s == s[0]).all())
    exact = amax / E4M3_MAX
    prev = torch.nextafter(qt.scales, torch.zeros_like(qt.scales)).double()  # the stored scale is the ceiling
    nz = exact[:, 0] > 0
    assert (s[nz] >= exact[nz]).all() and (prev[nz] < exact[nz]).all()
    assert qt.codes.float().isfinite().all() and (qt.codes.float().abs() <= E4M3_MAX).all()
    oracle = (w64 / s).float().to(torch.float8_e4m3fn)  # torch's cast as the e4m3 oracle (tested above)
    assert torch.equal(qt.codes.view(torch.uint8), oracle.view(torch.uint8))
    assert (qt.codes[3].float() == 0).all()
    deq = qt.dequantize(torch.float64)
    exact_product = qt.codes.double() * s
    assert torch.equal(deq, exact_product.float().double())  # the fp32 product (exact for half scales)
    if dtype != torch.float32:
        assert torch.equal(deq, exact_product)
    v = (w64 / s).abs()
    bound = s * torch.maximum(v * 2.0**-4, torch.full_like(v, 2.0**-10))  # half an e4m3 step: normal / subnormal
    assert ((deq - w64).abs() <= bound + w64.abs() * 2.0**-24).all()  # + the fp32 product's rounding
    rows = qt.dequantize(torch.float32, slice(10, 20))
    assert torch.equal(rows, deq[10:20].float())


def test_static_input_scale_is_the_fed_amax() -> None:
    g = torch.Generator().manual_seed(2)
    stats = LayerStats(32)
    need = frozenset({"amax", "token_amax"})
    batches = [torch.randn(3, 7, 32, generator=g) * k for k in (1.0, 5.0, 0.5)]
    batches[1][2, 4, 9] = -77.25  # the amax, negative
    for x in batches:
        stats.add_batch(x, need)
    stats.finish()
    assert stats.amax.item() == 77.25 and stats.tokens == 63 and stats.token_amax.shape == (63,)
    config = QuantConfig(method="fp8", bits=8, group_size=-1, act_scheme="static")
    qt, info = quantize_fp8(torch.randn(16, 32, generator=g), stats, config)
    assert qt.input_scale.dtype == torch.float32 and qt.input_scale.item() == _ceil(77.25 / 448, np.float32)
    assert info["input_scale"] == qt.input_scale.item()
    half, _ = quantize_fp8(torch.randn(16, 32, generator=g).half(), stats, config)  # a float16 model
    assert half.input_scale.item() == _ceil(77.25 / 448, np.float16)


def test_percentile_is_nearest_rank_of_token_maxima() -> None:
    t = torch.arange(1, 201, dtype=torch.float32)[torch.randperm(200, generator=torch.Generator().manual_seed(0))]
    assert percentile_amax(t, 100).item() == 200 and percentile_amax(t, 99).item() == 198
    assert percentile_amax(t, 50).item() == 100 and percentile_amax(t, 0.1).item() == 1
    stats = LayerStats(4)
    x = torch.zeros(200, 4)
    x[:, 1] = -t  # token i's max |x| is t[i]
    stats.add_batch(x, frozenset({"amax", "token_amax"}))
    config = QuantConfig(method="fp8", bits=8, group_size=-1, act_scheme="static", act_percentile=99.0)
    qt, _ = quantize_fp8(torch.ones(8, 4), stats.finish(), config)
    assert qt.input_scale.item() == pytest.approx(198 / 448, rel=1e-7)


def test_driver_static_scales_match_transformers_activations(tiny_model) -> None:
    """Block 0's q/k/v input is the normed embedding (no quantized layer before it): its amax, taken
    from transformers' own forward with a hook, is what the driver must calibrate."""
    import transformers

    from infq.formats.hf import Checkpoint, read_config
    from infq.quantizers.calibrate import CalibrationContext, calibrate
    from infq.runtime.arch import ModelConfig
    from infq.runtime.loader import HFWeights

    windows = torch.randint(3, 300, (4, 24), generator=torch.Generator().manual_seed(3))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    seen: dict[str, torch.Tensor] = {}

    def record(key: str):
        def hook(_module, args) -> None:
            seen[key] = args[0].abs().max()
        return hook

    layer = hf.model.layers[0]
    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(record("q")),
             layer.mlp.gate_proj.register_forward_pre_hook(record("gate_fp"))]
    with torch.no_grad():
        hf(windows)
    for h in hooks:
        h.remove()
    config = QuantConfig(method="fp8", bits=8, group_size=-1, act_scheme="static", nsamples=4, seqlen=24)
    cfg = ModelConfig.from_hf(read_config(tiny_model))
    ctx = CalibrationContext(cfg, HFWeights(Checkpoint(tiny_model)), config, quantize_fp8)
    block0 = next(calibrate(ctx, windows))
    for role in ("q_proj", "k_proj", "v_proj"):
        got = block0.tensors[f"model.layers.0.self_attn.{role}"].input_scale.item()
        assert got == pytest.approx(seen["q"].item() / 448, rel=1e-5), role
    gate = block0.tensors["model.layers.0.mlp.gate_proj"].input_scale.item()  # after quantized attention
    assert gate == pytest.approx(seen["gate_fp"].item() / 448, rel=0.05)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bad: float) -> None:
    w = torch.randn(8, 16)
    w[2, 3] = bad
    with pytest.raises(InfqError, match="NaN or inf") as e:
        quantize_fp8(w, LayerStats(16), QuantConfig(method="fp8", bits=8, group_size=-1))
    assert "\n" not in str(e.value)


def test_overflowing_scale_and_missing_calibration_are_refused() -> None:
    w = torch.full((4, 8), 6e4, dtype=torch.float16)
    w[0, 0] = float(torch.finfo(torch.float16).max)  # amax/448 fits; fine
    quantize_fp8(w, LayerStats(8), QuantConfig(method="fp8", bits=8, group_size=-1))
    with pytest.raises(InfqError, match="calibration data"):
        quantize_fp8(torch.ones(4, 8), LayerStats(8), QuantConfig(method="fp8", bits=8, group_size=-1, act_scheme="static"))


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"group_size": 128}, "never per group"),
    ({"sym": False}, "never per group"),
    ({"weight_scale": "block"}, "weight_scale 'block'"),
    ({"act_scheme": "token"}, "act_scheme 'token'"),
    ({"act_scheme": "dynamic", "act_percentile": 99.9}, "act_percentile applies"),
    ({"act_scheme": "static", "act_percentile": 0}, "out of range"),
])
def test_config_refusals(kwargs: dict, needle: str) -> None:
    with pytest.raises(InfqError, match=needle):
        QuantConfig(**{"method": "fp8", "bits": 8, "group_size": -1, **kwargs})
