"""RTN against an independent float64 min-max reference (reference §A.1.3).

Tolerances: our scales are the float64 scale rounded up to float16, so they lie in
[ref * (1 - 1e-6), ref * (1 + 2^-10)] (fp16 has 10 fraction bits; 1e-6 covers the fp32 division).
Codes are exact against a float64 recomputation with our scales, except where w/scale lies within
1e-5 of a rounding tie (fp32 vs fp64 division). |w - dequant| <= scale/2 * (1 + 1e-6) everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infq.errors import InfqError
from infq.quantizers.rtn import fake_quantize, minmax_params, quantize_rtn
from infq.quantizers.scheme import QuantConfig


def ref_grid(w: np.ndarray, bits: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """float64 reference on rows of w (..., n): min-max range including 0, [-1, 1] when all zero."""
    maxq = 2**bits - 1
    xmin = np.minimum(w.min(-1), 0.0)
    xmax = np.maximum(w.max(-1), 0.0)
    if sym:
        amax = np.maximum(-xmin, xmax)
        xmin, xmax = -amax, amax
    dead = (xmin == 0) & (xmax == 0)
    xmin, xmax = np.where(dead, -1.0, xmin), np.where(dead, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = np.full_like(scale, 2 ** (bits - 1)) if sym else np.round(-xmin / scale)
    return scale, zero


def _grouped(w: torch.Tensor, group_size: int) -> np.ndarray:
    out, inp = w.shape
    gs = inp if group_size == -1 else group_size
    return w.double().numpy().reshape(out, inp // gs, gs)  # (out, G, gs)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_rtn_matches_float64_reference(bits: int, sym: bool, group_size: int) -> None:
    g = torch.Generator().manual_seed(bits * 10 + sym)
    w = torch.randn(24, 128, generator=g) * torch.rand(24, 1, generator=g)  # rows of different range
    w[3] = w[3].abs()  # a row with no negative weight (upstream sym would clip it, we must not)
    w0 = w.clone()
    qt = quantize_rtn(w, QuantConfig(method="rtn", bits=bits, group_size=group_size, sym=sym))
    assert torch.equal(w, w0)  # input not mutated
    maxq = 2**bits - 1
    x = _grouped(w, group_size)  # (out, G, gs)
    ref_scale, ref_zero = ref_grid(x, bits, sym)  # (out, G)
    scale = qt.scales.double().numpy()  # (out, G)
    zero = qt.zeros.numpy().astype(np.float64)
    assert qt.scales.dtype == torch.float16 and qt.zeros.dtype == torch.int32
    assert np.all(scale >= ref_scale * (1 - 1e-6)) and np.all(scale <= ref_scale * (1 + 2**-10))
    if sym:
        assert np.all(zero == 2 ** (bits - 1))
    else:
        assert np.all(np.abs(zero - ref_zero) <= 1)
        assert np.array_equal(zero, np.round(-np.minimum(x.min(-1), 0) / scale))
    ratio = x / scale[..., None]  # (out, G, gs)
    ref_codes = np.clip(np.round(ratio) + zero[..., None], 0, maxq)
    codes = qt.codes.numpy().reshape(x.shape).astype(np.float64)
    near_tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-5
    assert np.all((codes == ref_codes) | near_tie)
    deq = qt.dequantize().double().numpy().reshape(x.shape)
    assert np.all(np.abs(x - deq) <= scale[..., None] / 2 * (1 + 1e-6))
    assert torch.equal(qt.g_idx, (torch.arange(128) // (128 if group_size == -1 else 32)).int())


def test_fake_quantize_equals_dequantize_exactly() -> None:
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    qt = quantize_rtn(w, QuantConfig(method="rtn", bits=4, group_size=64, sym=False))
    s = qt.scales.float()[:, :, None]  # (out, G, 1)
    z = qt.zeros.float()[:, :, None]
    fq = fake_quantize(w.reshape(16, 4, 64), s, z, 15).reshape(16, 256)
    assert torch.equal(fq, qt.dequantize())


def test_degenerate_groups_are_safe() -> None:
    w = torch.zeros(4, 64)
    w[1, :32] = 1e-9  # tiny but nonzero group
    w[2, 32:] = 3.0  # constant positive group
    for sym in (True, False):
        qt = quantize_rtn(w, QuantConfig(method="rtn", bits=4, group_size=32, sym=sym))
        s = qt.scales.float()
        assert torch.all(s > 0) and torch.all(torch.isfinite(s))
        assert 2 / 15 <= s[0, 0] <= 2 / 15 * (1 + 2**-10)  # all-zero group: range [-1, 1] as upstream
        deq = qt.dequantize()
        assert torch.all(deq[0] == 0) and torch.all(deq[3] == 0)  # all-zero rows stay exactly 0
        per_elem = s[:, qt.g_idx.long()]
        assert torch.all((w - deq).abs() <= per_elem / 2 * (1 + 1e-6))


def test_minmax_params_leading_dims_and_dtypes() -> None:
    x = torch.randn(2, 3, 5, 16, dtype=torch.bfloat16)
    scale, zero = minmax_params(x, 4, sym=False)
    assert scale.shape == zero.shape == (2, 3, 5) and scale.dtype == torch.float32
    assert torch.equal(scale, scale.half().float())  # fp16-representable
    qt = quantize_rtn(torch.randn(8, 64, dtype=torch.float16), QuantConfig(method="rtn", group_size=32))
    assert qt.codes.dtype == torch.uint8 and qt.shape == (8, 64)


def test_bad_inputs() -> None:
    with pytest.raises(InfqError, match="input dim 100.*-1 \\(per-channel\\)"):
        quantize_rtn(torch.randn(4, 100), QuantConfig(method="rtn", group_size=32))
    with pytest.raises(InfqError, match="NaN"):
        quantize_rtn(torch.full((4, 32), float("nan")), QuantConfig(method="rtn", group_size=32))
    with pytest.raises(InfqError, match="overflows float16"):
        quantize_rtn(torch.full((4, 32), 1e6), QuantConfig(method="rtn", group_size=32))
    with pytest.raises(InfqError, match="2-D"):
        quantize_rtn(torch.randn(4), QuantConfig(method="rtn"))
