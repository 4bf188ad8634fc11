"""GPTQ against an independent float64 solve, and the properties GPTQ must have (reference §B.1, §A.1.6).

Oracle: `ref_gptq` below, the unblocked column-by-column algorithm in numpy float64 with H⁻¹'s
upper Cholesky factor taken the paper's way (chol -> cholesky_inverse -> chol, float64) and the
same grid rule (min-max including 0, scale rounded up to fp16) fitted on the error-updated
weights when a group is entered. Tolerances:
  * codes: >= 99.9% identical. The solver runs in float32, so an update can land a value on the
    other side of a rounding tie (or a group's scale on the next fp16); a flipped code then
    perturbs the rest of its row slightly. In the cases below typically every code agrees.
  * err (relative output error): within 1e-6 relative of the reference when every code and
    scale agrees (the remaining difference is float32 rounding), else within 1% (a few flipped
    codes move err by ~1e-3 relative). loss: 1e-4 / 1%, as it sums float32 differences w - q of
    the updated weights, relatively coarser at 8 bits where w - q is tiny.
  * loss identity: Σ(w-q)²/d²/2 telescopes to tr(ΔW Hd ΔWᵀ)/2 with Hd the damped Hessian and
    ΔW = W - dequantize() (OBS: each step's error increase is (w-q)²/[Hd⁻¹]_pp). This ties the
    accumulated loss of the blocked float32 solve to the returned tensor; 1e-4 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infq.errors import InfqError
from infq.quantizers.calibrate import LayerStats
from infq.quantizers.gptq import quantize_gptq
from infq.quantizers.rtn import quantize_rtn
from infq.quantizers.scheme import QuantConfig


def ceil_fp16(s: np.ndarray) -> np.ndarray:
    h = s.astype(np.float16)
    h = np.where(h.astype(np.float64) < s, np.nextafter(h, np.float16(np.inf)), h)
    return h.astype(np.float64)


def ref_grid(x: np.ndarray, bits: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """float64 min-max grid of rows of x (..., k) -> (scale, zero) (...,)."""
    maxq = 2**bits - 1
    xmin, xmax = np.minimum(x.min(-1), 0.0), np.maximum(x.max(-1), 0.0)
    if sym:
        amax = np.maximum(-xmin, xmax)
        xmin, xmax = -amax, amax
    dead = (xmin == 0) & (xmax == 0)
    xmin, xmax = np.where(dead, -1.0, xmin), np.where(dead, 1.0, xmax)
    scale = ceil_fp16((xmax - xmin) / maxq)
    zero = np.full_like(scale, 2 ** (bits - 1)) if sym else np.clip(np.round(-xmin / scale), 0, maxq)
    return scale, zero


def ref_gptq(weight, hessian, bits, group_size, sym, desc_act=False, static=False, damp=0.01):
    """Unblocked float64 GPTQ -> codes (out, in), Q (out, in), g_idx (in,), loss; original order."""
    W, H = weight.double().numpy().copy(), hessian.double().numpy().copy()
    out, n = W.shape
    gs, maxq = (n if group_size == -1 else group_size), 2**bits - 1
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    table = ref_grid(W.reshape(out, n // gs, gs), bits, sym) if static or gs == n else None
    perm = np.argsort(-np.diag(H), kind="stable") if desc_act else np.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H[np.arange(n), np.arange(n)] += damp * np.mean(np.diag(H))
    L = torch.linalg.cholesky(torch.from_numpy(H))
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).numpy()  # H⁻¹ = UᵀU
    codes, Q, gid, loss = np.zeros((out, n)), np.zeros((out, n)), np.zeros(n, dtype=np.int64), 0.0
    for p in range(n):
        if table is None:
            if p % gs == 0:
                scale, zero = ref_grid(W[:, p : p + gs], bits, sym)
            gid[p] = p // gs
        else:
            gid[p] = perm[p] // gs
            scale, zero = table[0][:, gid[p]], table[1][:, gid[p]]
        c = np.clip(np.round(W[:, p] / scale) + zero, 0, maxq)
        codes[:, p], Q[:, p] = c, scale * (c - zero)
        e = (W[:, p] - Q[:, p]) / U[p, p]
        loss += float((e**2).sum()) / 2
        W[:, p:] -= np.outer(e, U[p, p:])
    inv = np.argsort(perm)
    return codes[:, inv], Q[:, inv], gid[inv], loss


def correlated_stats(n: int, tokens: int, seed: int) -> LayerStats:
    """H of inputs with a random correlation structure and a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * torch.rand(n, generator=g) ** 3  # (in, in) decaying spectrum
    x = torch.randn(tokens, n, generator=g) @ mix.T + 0.1 * torch.randn(tokens, n, generator=g)
    x = x * (1 + 9 * (torch.rand(n, generator=g) < 0.05))  # (tokens, in)
    stats = LayerStats(n)
    stats.add_batch(x, frozenset({"hessian"}))
    return stats


def weight(out: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n, generator=g) * torch.rand(out, 1, generator=g)  # (out, in)


def h_error(delta: torch.Tensor, H: torch.Tensor) -> float:
    """tr(Δ H Δᵀ) in float64."""
    d = delta.double()
    return float(((d @ H.double()) * d).sum())


def damped(stats: LayerStats, damp: float) -> torch.Tensor:
    """The Hessian the solver used (dead channels -> 1, then damped), original order."""
    H = stats.hessian.double().clone()
    dead = torch.diagonal(H) == 0
    torch.diagonal(H)[dead] = 1.0
    return H + damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)


CASES = [  # bits, group_size, sym, desc_act, static_groups, in
    (4, -1, True, False, False, 128),
    (4, 32, True, False, False, 256),
    (4, 32, False, False, False, 256),
    (3, -1, False, True, False, 128),
    (3, 32, True, True, False, 256),
    (4, 32, False, True, True, 256),
    (2, 64, True, True, False, 192),  # groups straddle the 128-column blocks
    (8, 96, False, False, False, 192),  # group size not dividing the block
    (4, 256, True, True, False, 512),  # group spanning two blocks
]


@pytest.mark.parametrize("bits, group_size, sym, desc_act, static, n", CASES)
def test_matches_float64_reference(bits, group_size, sym, desc_act, static, n) -> None:
    stats, W = correlated_stats(n, 4 * n, seed=bits + n), weight(48, n, seed=n)
    config = QuantConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, static_groups=static)
    qt, info = quantize_gptq(W, stats, config)
    codes, Q, g_idx, ref_loss = ref_gptq(W, stats.hessian, bits, group_size, sym, desc_act, static)
    agree = float((qt.codes.numpy() == codes).mean())
    assert agree >= 0.999
    assert np.array_equal(qt.g_idx.numpy(), g_idx)
    deq = qt.dequantize()
    ref_err = h_error(W - torch.from_numpy(Q), stats.hessian) / h_error(W, stats.hessian)
    exact = agree == 1.0 and np.array_equal(deq.double().numpy(), Q)
    assert info["err"] == pytest.approx(ref_err, rel=1e-6 if exact else 1e-2)
    assert info["loss"] == pytest.approx(ref_loss, rel=1e-4 if exact else 1e-2)
    # the loss accumulated by the blocked solve telescopes to the error of the returned tensor
    assert 2 * info["loss"] == pytest.approx(h_error(W - deq, damped(stats, info["damp"])), rel=1e-4)
    # info["err"] is the H-weighted error of what was returned
    assert info["err"] == pytest.approx(h_error(W - deq, stats.hessian) / h_error(W, stats.hessian), rel=1e-6)
    assert info["damp"] == 0.01 and info["damp_escalations"] == 0 and info["dead"] == 0


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_beats_rtn_on_correlated_inputs(bits: int, group_size: int) -> None:
    stats, W = correlated_stats(128, 512, seed=7), weight(64, 128, seed=8)
    config = QuantConfig(bits=bits, group_size=group_size)
    qt, info = quantize_gptq(W, stats, config)
    rtn = quantize_rtn(W, QuantConfig(method="rtn", bits=bits, group_size=group_size))
    gptq_err = h_error(W - qt.dequantize(), stats.hessian)
    rtn_err = h_error(W - rtn.dequantize(), stats.hessian)
    assert gptq_err < 0.7 * rtn_err  # typically 2-5x lower here


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize(
    "group_size, desc_act, static", [(-1, False, False), (32, False, False), (32, True, True)]
)
def test_diagonal_hessian_is_rtn(sym: bool, group_size: int, desc_act: bool, static: bool) -> None:
    """With uncorrelated inputs H is diagonal, Hinv's factor is diagonal, no error is propagated, and
    GPTQ is RTN exactly (any positive diagonal; act-order only reorders when groups are static).
    An empirical H of uncorrelated samples is only nearly diagonal, so that case is checked for a
    high (not total) agreement."""
    n, g = 128, torch.Generator().manual_seed(3)
    W = weight(32, n, seed=4)
    stats = LayerStats(n, tokens=1, hessian=torch.diag(torch.rand(n, generator=g, dtype=torch.float64) + 0.5))
    config = QuantConfig(bits=4, group_size=group_size, sym=sym, desc_act=desc_act, static_groups=static)
    qt, _ = quantize_gptq(W, stats, config)
    rtn = quantize_rtn(W, QuantConfig(method="rtn", bits=4, group_size=group_size, sym=sym))
    assert torch.equal(qt.codes, rtn.codes) and torch.equal(qt.scales, rtn.scales)
    assert torch.equal(qt.zeros, rtn.zeros) and torch.equal(qt.g_idx, rtn.g_idx)
    sampled = LayerStats(n)
    sampled.add_batch(torch.randn(200_000, n, generator=g), frozenset({"hessian"}))
    qt, _ = quantize_gptq(W, sampled, config)
    assert float((qt.codes == rtn.codes).float().mean()) > 0.95


@pytest.mark.parametrize("desc_act", [False, True])
def test_dead_inputs(desc_act: bool) -> None:
    n = 128
    stats, W = correlated_stats(n, 512, seed=11), weight(32, n, seed=12)
    dead = torch.tensor([0, 5, 31, 32, 33, 100, 127])
    H = stats.hessian.clone()
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    stats = LayerStats(n, tokens=stats.tokens, hessian=H)
    qt, info = quantize_gptq(W, stats, QuantConfig(bits=4, group_size=32, sym=False, desc_act=desc_act))
    deq = qt.dequantize()
    assert torch.isfinite(deq).all() and torch.isfinite(qt.scales.float()).all()
    assert torch.all(deq[:, dead] == 0)  # inputs never seen: weight 0 (exactly representable)
    assert info["dead"] == len(dead) and np.isfinite(info["loss"]) and 0 < info["err"] < 0.05
    codes, Q, _, _ = ref_gptq(W, H, 4, 32, False, desc_act)
    assert float((qt.codes.numpy() == codes).mean()) >= 0.999
    all_dead = LayerStats(n, tokens=1, hessian=torch.zeros(n, n, dtype=torch.float64))
    qt, info = quantize_gptq(W, all_dead, QuantConfig(bits=4, group_size=32))
    assert torch.all(qt.dequantize() == 0) and info["dead"] == n and info["err"] == 0.0


def test_damping_escalates_and_reports() -> None:
    """An indefinite H (a low-rank PSD Hessian minus a rank-1 term, as accumulated rounding can leave
    one) fails Cholesky at damp 1e-6; the solver escalates x10 until it factors and reports it."""
    n, g = 64, torch.Generator().manual_seed(5)
    x = torch.randn(32, n, generator=g, dtype=torch.float64)  # 32 tokens < 64 inputs: rank-deficient
    H = 2 / 32 * x.T @ x
    v = torch.randn(n, generator=g, dtype=torch.float64)
    H -= 1e-3 * torch.diagonal(H).mean() * torch.outer(v, v) / v.dot(v)  # eigenvalue ~ -1e-3 mean
    stats = LayerStats(n, tokens=32, hessian=H)
    W = weight(32, n, seed=6)
    qt, info = quantize_gptq(W, stats, QuantConfig(bits=4, group_size=32, damp_percent=1e-6))
    assert info["damp_escalations"] > 0 and info["damp"] > 1e-6
    assert info["damp"] == pytest.approx(1e-6 * 10 ** info["damp_escalations"])
    assert torch.isfinite(qt.dequantize()).all() and np.isfinite(info["loss"])
    _, info = quantize_gptq(W, stats, QuantConfig(bits=4, group_size=32, damp_percent=0.05))
    assert info["damp_escalations"] == 0 and info["damp"] == 0.05
    bad = LayerStats(2, tokens=1, hessian=torch.tensor([[1.0, 5.0], [5.0, 1.0]], dtype=torch.float64))
    with pytest.raises(InfqError, match="--damp"):  # eigenvalue -4 * mean diag: even damp 1.0 fails
        quantize_gptq(torch.randn(4, 2), bad, QuantConfig(bits=4, group_size=-1))


@pytest.mark.parametrize("desc_act", [False, True])
def test_pure_and_deterministic(desc_act: bool) -> None:
    stats, W = correlated_stats(128, 512, seed=13), weight(32, 128, seed=14)
    W0, H0 = W.clone(), stats.hessian.clone()
    config = QuantConfig(bits=4, group_size=32, desc_act=desc_act)
    a, info_a = quantize_gptq(W, stats, config)
    b, info_b = quantize_gptq(W, stats, config)
    assert torch.equal(W, W0) and torch.equal(stats.hessian, H0)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    assert torch.equal(a.zeros, b.zeros) and torch.equal(a.g_idx, b.g_idx) and info_a == info_b


@pytest.mark.parametrize("static", [False, True])
def test_act_order_g_idx(static: bool) -> None:
    n, gs = 256, 32
    stats, W = correlated_stats(n, 1024, seed=15), weight(40, n, seed=16)
    config = QuantConfig(bits=4, group_size=gs, sym=False, desc_act=True, static_groups=static)
    qt, info = quantize_gptq(W, stats, config)
    assert qt.g_idx.dtype == torch.int32 and qt.scales.dtype == torch.float16
    assert qt.codes.dtype == torch.uint8 and qt.zeros.dtype == torch.int32
    assert torch.equal(torch.bincount(qt.g_idx.long()), torch.full((n // gs,), gs))
    perm = torch.argsort(torch.diagonal(stats.hessian), descending=True, stable=True)
    expect = torch.arange(n) // gs  # static: the original columns' groups
    if not static:  # AutoGPTQ: g_idx[perm[i]] = i // group_size
        expect = torch.empty(n, dtype=torch.long)
        expect[perm] = torch.arange(n) // gs
        assert not torch.equal(expect, torch.arange(n) // gs)
    assert torch.equal(qt.g_idx.long(), expect)
    deq = qt.dequantize()  # the committed weights: the solve's loss is the error of exactly these
    assert 2 * info["loss"] == pytest.approx(h_error(W - deq, damped(stats, info["damp"])), rel=1e-4)
    _, Q, _, _ = ref_gptq(W, stats.hessian, 4, gs, False, True, static)
    assert float((deq.double().numpy() == Q).mean()) >= 0.999


def test_bad_inputs() -> None:
    stats, W = correlated_stats(64, 128, seed=17), weight(8, 64, seed=18)
    config = QuantConfig(bits=4, group_size=32)
    with pytest.raises(InfqError, match="no Hessian"):
        quantize_gptq(W, LayerStats(64), config)
    with pytest.raises(InfqError, match="does not match"):
        quantize_gptq(weight(8, 128, seed=1), stats, config)
    with pytest.raises(InfqError, match="2-D"):
        quantize_gptq(torch.randn(64), stats, config)
    with pytest.raises(InfqError, match="input dim 64"):
        quantize_gptq(W, stats, QuantConfig(bits=4, group_size=48))
    with pytest.raises(InfqError, match="weight contains NaN"):
        quantize_gptq(torch.full((8, 64), float("nan")), stats, config)
    nan = LayerStats(64, tokens=1, hessian=torch.full((64, 64), float("nan"), dtype=torch.float64))
    with pytest.raises(InfqError, match="Hessian contains NaN"):
        quantize_gptq(W, nan, config)
    negative = LayerStats(64, tokens=1, hessian=-stats.hessian)
    with pytest.raises(InfqError, match="negative diagonal"):
        quantize_gptq(W, negative, config)
