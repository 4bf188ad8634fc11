"""Shared test tolerances: a kernel may be at most FACTOR times as wrong as PyTorch doing the same
computation in the same precision, measured against a float64 oracle (flash-attention's rule),
plus a floor of a few output ulps for results PyTorch happens to get exactly right.
"""

from __future__ import annotations

import torch

FACTOR = 2.0  # kernel error <= FACTOR * same-precision PyTorch error + floor
FLOOR_ULPS = 2.0  # floor, in units of the output dtype's eps times the oracle's max |value|


def max_abs_err(out: torch.Tensor, oracle: torch.Tensor) -> float:
    return (out.double() - oracle.double()).abs().max().item()


def assert_within_baseline(out: torch.Tensor, oracle: torch.Tensor, baseline: torch.Tensor,
                           factor: float = FACTOR, floor_ulps: float = FLOOR_ULPS) -> None:
    """|out - oracle| <= factor * |baseline - oracle| + floor_ulps * eps(out.dtype) * max|oracle|,
    all as max over elements; `baseline` is PyTorch's same-precision result, `oracle` float64."""
    assert out.shape == oracle.shape, (tuple(out.shape), tuple(oracle.shape))
    assert torch.isfinite(out).all(), "non-finite output"
    err, base = max_abs_err(out, oracle), max_abs_err(baseline, oracle)
    floor = floor_ulps * torch.finfo(out.dtype).eps * oracle.abs().max().item()
    assert err <= factor * base + floor, f"error {err:.3g} > {factor} x PyTorch's {base:.3g} + floor {floor:.3g}"
