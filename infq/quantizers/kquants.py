"""GGML block quantization (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K): encoders and decoders.

One table of block types (`BLOCK_TYPES`: ggml id, elements per block, bytes per block) and one small
class per type with `encode(x, qw, search)` and `decode(blocks)`, vectorized over all blocks in torch.
The encoders fit scales the way llama.cpp's reference quantizers do (reference §A.5.2; the searches
below): without an importance matrix the `quantize_row_*_ref` path, with one (`qw`,
per-input-channel mean x^2, shape (in,)) the `quantize_row_*_impl` path. Both code the scales, then
re-round every element against the *decoded* fp16/6-bit scales; a block keeps the plain RTN
encoding where that decodes closer (see `_encode_guarded`). The output is the exact GGUF block
bytes (uint8, `(rows, n/block * type_size)`), written to a file as is; `dequantize` is the
reference decoder, bit-identical to gguf-py's. `search=False` is a plain round-to-nearest encoder
into the same layout (min/max scales, no search, imatrix ignored), kept as a baseline.
Limits: rows must be a multiple of the block size (the mix logic chooses fallbacks); float32 math
(float64 for the candidate searches' sums).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np
import torch

from infq.errors import InfqError
from infq.quantizers.scheme import QuantConfig, QuantizedTensor

if TYPE_CHECKING:
    from infq.quantizers.calibrate import LayerStats

# ---------------------------------------------------------------- scale searches
# The scale searches of llama.cpp's reference K-quant encoders, vectorized over blocks in torch.
#
# Each function fits one scale (and for the asymmetric ones a min) per sub-block of `x (..., n)`,
# following `ggml-quants.c` as described in reference §A.5.2: `make_qx` (symmetric, 19 candidate
# inverse scales, weighted least squares), `make_q3` (symmetric with coordinate descent),
# `make_qkx` (scale + min, a grid of candidates each refined by 2x2 weighted least squares; the
# `qkx2`/`qkx3` variants differ only in their arguments) and `make_qp` (positive 6/4-bit sub-block
# scales with weights, imatrix path).
# The grids of make_qx/make_qkx are scored without materializing (sub-blocks, candidates, n) codes:
# along a grid an element's code rint(isc_c * x) is monotone in c and moves by at most two steps
# (the grid spans 1.5-2 code units), so every candidate's Σw·L, Σw·L², Σw·x·L is the sum under the
# first candidate plus a cumsum over a histogram of the candidates where codes step (`_code_steps`,
# `_candidate_sums`): O(n + C) per sub-block instead of O(n·C). The step positions are found by a
# linear estimate corrected against the exact float32 rint, so the codes are exactly those of the
# straightforward search (tests/quantizers/test_kquants.py keeps that search as the oracle). The
# sums and the closed-form squared error of each candidate's (float32) scale and min are float64,
# so the pick is the truly best candidate; the straightforward float32 search can mis-order two
# candidates whose errors agree to ~1e-6, so picks differ from it (and from llama.cpp) there. The
# first best wins, in upstream's candidate order. Q2_K's absolute-error criterion has no closed
# form: its candidates' errors are evaluated directly (16 candidates of 16 elements).
# Non-finite intermediates (subnormal ranges overflow 1/range) are mapped to code 0; rows whose
# grid is not finite never take a candidate. Selections on whole (..., n) tensors are blends
# (a + (b - a) * mask) rather than torch.where, which runs ~10x slower than arithmetic on CPU;
# every blended value is finite, so they are exact.

GROUP_MAX_EPS = 1e-15  # below this |max| a sub-block is treated as all zero (ggml's GROUP_MAX_EPS)


def rint(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even (the 1.5*2^23 trick); NaN -> 0."""
    return torch.nan_to_num(torch.round(v), nan=0.0)


def roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf: half away from zero, exact (no x + 0.5 double rounding)."""
    a = v.abs()
    f = a.floor()
    return torch.sign(v) * (f + (a - f >= 0.5).to(v.dtype))


def signed_max(x: torch.Tensor) -> torch.Tensor:
    """The element of largest |x| along the last dim (first on ties) -> (...,)."""
    idx = x.abs().argmax(dim=-1, keepdim=True)
    return x.gather(-1, idx).squeeze(-1)


def _f32(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device)


def _code_steps(isc: torch.Tensor, x: torch.Tensor, lo: int, hi: int
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Every candidate's codes at once, as a first code plus the candidates where a code steps.

    isc (M, C) finite inverse scales, monotone along C; x (M, n). The code of element e under
    candidate c is clamp(rint(isc[c] * x[e]), lo, hi): monotone in c, and it moves by at most a
    few steps over the grid (the grid spans < 2 code units). -> L0 (M, n) codes under candidate 0,
    sgn (M, n) the direction (+-1, 0), and per step j = 1.. idx (M, n) long: the first candidate
    whose code is L0 + sgn*j (C: never). A linear estimate of each crossing is corrected against
    the exact float32 rint, so the codes are those of evaluating every candidate.
    """
    C = isc.shape[-1]

    def code(c: torch.Tensor) -> torch.Tensor:  # c (M, n) long -> the codes under candidate c
        return isc.gather(-1, c).mul_(x).round_().clamp_(lo, hi)  # finite: no NaN to map

    L0 = (isc[:, :1] * x).round_().clamp_(lo, hi)  # (M, n)
    delta = (isc[:, -1:] * x).round_().clamp_(lo, hi).sub_(L0)
    sgn = torch.sign(delta)
    mag = delta.abs()
    a, d = isc[:, :1], (isc[:, -1:] - isc[:, :1]) / (C - 1)  # isc[c] ~ a + d*c
    steps = []
    for j in range(1, int(mag.max()) + 1 if mag.numel() else 1):
        active = mag >= j  # (M, n): crosses level j inside the grid, at some c in [1, C)
        est = (sgn * (j - 0.5)).add_(L0).div_(x).sub_(a).div_(d)  # where isc[c] * x meets the half-way point
        c = torch.nan_to_num(est.ceil_(), nan=1.0).clamp_(1, C - 1).mul_(active).long()  # inactive: 0
        while True:  # first candidate that reached level j: move up, then down, exactly
            up = active & (code(c).sub_(L0).mul_(sgn) < j)
            if not bool(up.any()):
                break
            c = c + up
        while True:
            prev = (c - 1).clamp(min=0)
            down = active & (c > 1) & (code(prev).sub_(L0).mul_(sgn) >= j)
            if not bool(down.any()):
                break
            c = c - down.long()
        steps.append(c + C * ~active)
    return L0, sgn, steps


def _candidate_sums(isc: torch.Tensor, xq: torch.Tensor, x: torch.Tensor, w: torch.Tensor, lo: int,
                    hi: int) -> torch.Tensor:
    """Σw·L, Σw·L², Σw·x·L (float64) for every candidate's codes L = clamp(rint(isc * xq), lo, hi):
    isc (M, C); xq, x, w (M, n) -> (M, 3, C).

    O(n + C) per row: the sums under candidate 0 plus a histogram of the steps over candidates,
    accumulated with a cumsum (see `_code_steps`).
    """
    M, C = isc.shape
    L0, sgn, steps = _code_steps(isc, xq, lo, hi)
    w64, L64 = w.double(), L0.double()
    wx, wl = w64 * x.double(), w64 * L64
    base = torch.stack([wl.sum(-1), (wl * L64).sum(-1), (wx * L64).sum(-1)], -1)  # (M, 3)
    hist = torch.zeros(3, M, C + 1, dtype=torch.float64, device=x.device)
    if steps:
        s64 = sgn.double()
        ws, wxs, twols = w64 * s64, wx * s64, 2 * wl * s64
        for j, c in enumerate(steps, 1):  # step j: L -> L0 + sgn*j, so L^2 grows by 2*sgn*L0 + 2j - 1
            hist[0].scatter_add_(-1, c, ws)
            hist[1].scatter_add_(-1, c, twols + (2 * j - 1) * w64)
            hist[2].scatter_add_(-1, c, wxs)
    return base[..., None] + hist[..., :C].cumsum(-1).transpose(0, 1)  # (M, 3, C)


def make_qx(x: torch.Tensor, nmax: int, w: torch.Tensor | None, search: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric fit, codes L in [0, 2*nmax) meaning L - nmax. x, w: (..., n) -> (scale (...), L).

    w None means weights x^2 (rmse_type 1). search False is plain RTN: scale = max / -nmax.
    The 19 candidates are scored from `_candidate_sums` (float64), best (Σwxl)^2/Σwl^2 wins, the
    first in upstream's order (0, -9..-1, 1..9) on ties.
    """
    mx = signed_max(x)  # (...)
    zero = mx.abs() < GROUP_MAX_EPS
    if not search:
        iscale = -nmax / mx
        L = rint(iscale[..., None] * x).clamp(-nmax, nmax - 1)
        return torch.where(zero, 0.0, 1 / iscale), torch.where(zero[..., None], 0.0, L + nmax)
    n = x.shape[-1]
    w = x * x if w is None else w
    steps = [float(s) for s in range(-9, 10)]  # ascending, so the inverse scales are monotone
    # -(nmax + 0.1f*is) / max, in float32 as upstream; zero rows get a harmless stand-in max
    isc = -(nmax + _f32([0.1], x) * _f32(steps, x)) / torch.where(zero, 1.0, mx).reshape(-1, 1)  # (M, 19)
    sums = _candidate_sums(isc, x.reshape(-1, n), x.reshape(-1, n), w.expand_as(x).reshape(-1, n), -nmax, nmax - 1)
    suml2, sumlx = sums[:, 1], sums[:, 2]  # (M, 19)
    gain = torch.where(suml2 > 0, sumlx * sumlx / suml2, 0.0)
    upstream = [9] + list(range(9)) + list(range(10, 19))  # candidate order 0, -9..-1, 1..9
    order = torch.tensor(upstream, device=x.device)
    pick = order[gain[:, order].argmax(-1)][:, None]  # (M, 1), first best in upstream's order
    l2, lx = suml2.gather(-1, pick), sumlx.gather(-1, pick)
    scale = torch.where(l2 > 0, lx / l2, 0.0).to(torch.float32).reshape(mx.shape)
    L = rint(isc.gather(-1, pick) * x.reshape(-1, n)).clamp(-nmax, nmax - 1).reshape(x.shape)
    scale = torch.where(zero, 0.0, torch.nan_to_num(scale))
    return scale, (L + nmax) * ~zero[..., None]


def make_q3(x: torch.Tensor, nmax: int, search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Q3_K's fit: start at max / -nmax, then up to 5 passes of per-element coordinate descent on
    the x^2-weighted objective (Σwxl)^2/Σwl^2. -> (scale (...), L in [0, 2*nmax))."""
    mx = signed_max(x)
    zero = mx.abs() < GROUP_MAX_EPS
    iscale = -nmax / mx  # (...)
    L = rint(iscale[..., None] * x).clamp(-nmax, nmax - 1)  # (..., n)
    if not search:
        return torch.where(zero, 0.0, 1 / iscale), torch.where(zero[..., None], 0.0, L + nmax)
    w = x * x
    sumlx = (w * x * L).sum(-1)
    suml2 = (w * L * L).sum(-1)
    for _ in range(5):  # a pass that changes nothing leaves the state as is, so 5 passes == upstream
        for i in range(x.shape[-1]):
            wi, xi, li = w[..., i], x[..., i], L[..., i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new_l = rint(xi * sl2 / slx).clamp(-nmax, nmax - 1)
            slx2 = slx + wi * xi * new_l
            sl22 = sl2 + wi * new_l * new_l
            ok = (slx > 0) & (new_l != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[..., i] = torch.where(ok, new_l, li)
            sumlx = torch.where(ok, slx2, sumlx)
            suml2 = torch.where(ok, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return torch.where(zero, 0.0, scale), (L + nmax) * ~zero[..., None]


def make_qkx(x: torch.Tensor, nmax: int, w: torch.Tensor, rmin: float, rdelta: float, nstep: int,
             use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale + min fit: value = scale*L - the_min, L in [0, nmax], the_min >= 0.

    x, w: (..., n) -> (scale (...), the_min (...), L (..., n)). nstep 0 is plain min/max RTN.
    Squared error (use_mad False): every candidate's sums come from `_candidate_sums` and its
    error from the closed form of the 2x2 fit, in float64; the absolute error (Q2_K) evaluates
    every candidate directly.
    """
    mn = x.amin(-1).clamp(max=0.0)  # (...)
    mx = x.amax(-1)
    flat = mx <= mn
    rng = mx - mn
    xm = x - mn[..., None]  # (..., n)
    iscale = nmax / rng
    scale = 1 / iscale
    L = rint(iscale[..., None] * xm).clamp(0, nmax)  # (..., n)
    mins = mn.clone()
    if nstep >= 1:
        steps = _f32([float(s) for s in range(nstep + 1)], x)
        num = (rmin + rdelta * steps) + nmax  # (C,) float32: (rmin + rdelta*is) + nmax
        isc = num / rng[..., None]  # (..., C)
        fit = _qkx_mad if use_mad else _qkx_squared
        better, ts, tm, pick = fit(x, xm, w, isc, flat, scale, mins, L, nmax)
        scale = torch.where(better, ts, scale)
        mins = torch.where(better, tm, mins)
        chosen = rint(isc.gather(-1, pick[..., None]) * xm).clamp(0, nmax)
        L = L + (chosen - L) * better[..., None]
    scale = torch.where(flat, 0.0, torch.nan_to_num(scale))
    L = L * ~flat[..., None]
    return scale, -mins, L


def _qkx_lsq(x: torch.Tensor, xm: torch.Tensor, w: torch.Tensor, isc: torch.Tensor, flat: torch.Tensor,
             nmax: int) -> tuple:
    """Every candidate's 2x2 weighted least-squares (scale, min) in float64, from `_candidate_sums`.

    -> ts, tm (..., C) float32, valid (..., C) (a usable grid and D > 0), and the float64 sums
    (sum_l, sum_l2, sum_xl (..., C); sum_w, sum_x (..., 1)) for scoring.
    """
    lead, n, C = x.shape[:-1], x.shape[-1], isc.shape[-1]
    ok = ~flat & torch.isfinite(isc).all(-1)  # rows with a usable grid (not flat, no 1/subnormal)
    grid = torch.where(ok[..., None], isc, 1.0 + torch.arange(C, device=x.device))
    sums = _candidate_sums(grid.reshape(-1, C), xm.reshape(-1, n), x.reshape(-1, n), w.reshape(-1, n), 0, nmax)
    sum_l, sum_l2, sum_xl = sums.reshape(*lead, 3, C).unbind(-2)  # (..., C) float64
    w64 = w.double()
    sum_w, sum_x = w64.sum(-1, keepdim=True), (w64 * x.double()).sum(-1, keepdim=True)
    D = sum_w * sum_l2 - sum_l * sum_l
    ts = (sum_w * sum_xl - sum_x * sum_l) / D
    tm = (sum_l2 * sum_x - sum_l * sum_xl) / D
    pos = tm > 0
    tm = torch.where(pos, 0.0, tm).to(torch.float32)
    ts = torch.where(pos, sum_xl / sum_l2, ts).to(torch.float32)
    return ts, tm, (D > 0) & ok[..., None], (sum_l, sum_l2, sum_xl, sum_w, sum_x)


def _qkx_squared(x, xm, w, isc, flat, scale, mins, L, nmax):
    """make_qkx's search on the weighted squared error -> (better, scale, min, candidate) per row.
    Each candidate's error is the closed form of its sums, in float64 (no cancellation trouble)."""
    ts, tm, valid, (sum_l, sum_l2, sum_xl, sum_w, sum_x) = _qkx_lsq(x, xm, w, isc, flat, nmax)
    w64, x64 = w.double(), x.double()
    sum_x2 = (w64 * x64 * x64).sum(-1, keepdim=True)
    s, m = ts.double(), tm.double()  # the error of the float32 pair actually kept
    cur = (s * s * sum_l2 + 2 * s * m * sum_l - 2 * s * sum_xl + m * m * sum_w - 2 * m * sum_x + sum_x2)
    cur = torch.where(valid, cur, torch.inf)
    diff = scale.double()[..., None] * L.double() + mins.double()[..., None] - x64
    best = (w64 * diff * diff).sum(-1)  # the plain min/max fit's error
    low, pick = cur.min(-1)  # first minimum
    better = low < best
    return better, ts.gather(-1, pick[..., None]).squeeze(-1), tm.gather(-1, pick[..., None]).squeeze(-1), pick


def _qkx_mad(x, xm, w, isc, flat, scale, mins, L, nmax):
    """make_qkx's search on the weighted absolute error: the fits from `_qkx_lsq`, each candidate's
    error evaluated directly on its codes (..., C, n); upstream's strict "better" rule in order."""
    ts, tm, valid, _ = _qkx_lsq(x, xm, w, isc, flat, nmax)
    isc = torch.where(torch.isfinite(isc), isc, 0.0)  # rows without a usable grid are never picked

    diff = scale[..., None] * L + mins[..., None] - x  # (scale*L + min) - x, as upstream
    best = (w * diff.abs()).sum(-1)
    La = (isc[..., None] * xm[..., None, :]).round_().clamp_(0, nmax)  # (..., C, n), finite
    diff = La * ts[..., None]  # the same for every candidate, in place (no more (..., C, n) temporaries)
    diff.add_(tm[..., None]).sub_(x[..., None, :]).abs_()
    cur = (diff @ w[..., None]).squeeze(-1)  # (..., C): Σ w |diff| as a batched mat-vec
    pick = torch.zeros_like(mins, dtype=torch.long)
    better = torch.zeros_like(flat)
    for c in range(isc.shape[-1]):  # strict "better than the best so far", as upstream
        b = valid[..., c] & (cur[..., c] < best)
        pick = torch.where(b, c, pick)
        best = torch.where(b, cur[..., c], best)
        better = better | b
    return better, ts.gather(-1, pick[..., None]).squeeze(-1), tm.gather(-1, pick[..., None]).squeeze(-1), pick


def make_qp(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize positive sub-block scales x (..., n) to [0, nmax] with weights w: a +-0.4 grid of
    inverse scales, then 5 passes of coordinate descent. -> (scale (...), L (..., n))."""
    mx = x.amax(-1).clamp(min=0.0)
    zero = mx < GROUP_MAX_EPS
    iscale = nmax / mx
    L0 = rint(iscale[..., None] * x).clamp(0, nmax)

    def mse(isc: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        d = x - (1 / isc)[..., None] * L
        return (w * d * d).sum(-1)

    best = mse(iscale, L0)
    for s in (-4, -3, -2, -1, 1, 2, 3, 4):
        isc = (_f32([0.1], x) * s + nmax) / mx
        m = mse(isc, rint(isc[..., None] * x).clamp(0, nmax))
        better = m < best
        best = torch.where(better, m, best)
        iscale = torch.where(better, isc, iscale)
    L = rint(iscale[..., None] * x).clamp(0, nmax)
    sumlx = (w * x * L).sum(-1)
    suml2 = (w * L * L).sum(-1)
    for _ in range(5):
        for i in range(x.shape[-1]):
            wi, xi, li = w[..., i], x[..., i], L[..., i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new_l = rint(xi * sl2 / slx).clamp(max=nmax)
            slx2 = slx + wi * xi * new_l
            sl22 = sl2 + wi * new_l * new_l
            ok = (slx > 0) & (sl2 > 0) & (new_l != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[..., i] = torch.where(ok, new_l, li)
            sumlx = torch.where(ok, slx2, sumlx)
            suml2 = torch.where(ok, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero[..., None], 0.0, L.clamp(min=0))


# ---------------------------------------------------------------- block types

QK_K = 256
_ROW_CHUNK_ELEMENTS = 1 << 16  # rows encoded together: temporaries stay cache-sized (measured best on CPU)


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float (...) -> its IEEE half bytes (..., 2), little-endian."""
    return v.to(torch.float16).unsqueeze(-1).contiguous().view(torch.uint8)


def _f16_value(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 -> float32 (...)."""
    return b.contiguous().view(torch.float16).squeeze(-1).to(torch.float32)


def _f16_round(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).to(torch.float32)


def _u8(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.int32).to(torch.uint8)


def _pack_nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return _u8(lo) & 15 | (_u8(hi) & 15) << 4


def _pack_bits(bits: torch.Tensor, width: int) -> torch.Tensor:
    """bits (..., k, m) of `width` bits each -> (..., m): field i at bit width*i."""
    out = torch.zeros(bits.shape[:-2] + bits.shape[-1:], dtype=torch.uint8, device=bits.device)
    for i in range(bits.shape[-2]):
        out |= (_u8(bits[..., i, :]) & ((1 << width) - 1)) << (width * i)
    return out


def _unpack_bits(packed: torch.Tensor, width: int, k: int) -> torch.Tensor:
    """(..., m) uint8 -> (..., k, m): field i of `width` bits at bit width*i."""
    shifts = torch.arange(0, width * k, width, dtype=torch.uint8, device=packed.device)
    return (packed.unsqueeze(-2) >> shifts[:, None]) & ((1 << width) - 1)


def _row_sigma2(x: torch.Tensor, factor: float, per_row: bool) -> torch.Tensor:
    """factor * mean(x^2) over a whole row (per_row; x (R, NB, bs) -> (R, 1, 1)) or a block (-> (R, NB, 1))."""
    if per_row:
        return factor * (x * x).sum((-1, -2), keepdim=True) / (x.shape[-1] * x.shape[-2])
    return factor * (x * x).sum(-1, keepdim=True) / x.shape[-1]


class BlockType:
    """One GGML block type: `name`, ggml type id, elements and bytes per block."""

    name: str = ""
    ggml_type: int = -1
    block: int = 32
    nbytes: int = 0

    def encode(self, x: torch.Tensor, qw: torch.Tensor | None, search: bool) -> torch.Tensor:
        """x (R, NB, block) float32, qw (NB, block) | None -> uint8 (R, NB, nbytes)."""
        raise NotImplementedError

    def decode(self, b: torch.Tensor) -> torch.Tensor:
        """uint8 (..., nbytes) -> float32 (..., block)."""
        raise NotImplementedError

    def chunk_elements(self, weighted: bool) -> int:
        """Elements encoded per call on CPU: cache-sized temporaries against per-call Python loops."""
        return _ROW_CHUNK_ELEMENTS


class Q8_0(BlockType):
    name, ggml_type, block, nbytes = "Q8_0", 8, 32, 34

    def encode(self, x, qw, search):
        d = x.abs().amax(-1) / 127  # (R, NB); the imatrix does not change Q8_0 (as upstream)
        inv = torch.where(d != 0, 1 / d, 0.0)
        # 1/d overflows for subnormal blocks (d then rounds to fp16 0): saturate instead of casting inf
        q = torch.nan_to_num(roundf(x * inv[..., None]), nan=0.0).clamp(-127, 127)
        q = q.to(torch.int8).view(torch.uint8)
        return torch.cat([_f16_bytes(d), q], -1)

    def decode(self, b):
        return b[..., 2:].contiguous().view(torch.int8).to(torch.float32) * _f16_value(b[..., :2])[..., None]


class _Legacy(BlockType):
    """Q4_0/Q5_0 (symmetric, d = max / -2^(bits-1)) and Q4_1/Q5_1 (d, min)."""

    bits = 4
    affine = False

    def _fit(self, x, qw, search):
        """-> d (R, NB), m (R, NB) | None, codes L (R, NB, 32) in [0, 2^bits)."""
        half, top = 1 << (self.bits - 1), (1 << self.bits) - 1
        if qw is not None and search:
            w = qw * torch.sqrt(_row_sigma2(x, 1.0, per_row=True) + x * x)  # (R, NB, 32)
            if not self.affine:
                d, L = make_qx(x, half, w)
                return d, None, L
            d, the_min, L = make_qkx(x, top, w, -0.9, 0.05, 36, False)
            return d, -the_min, L
        if not self.affine:
            d = signed_max(x) / -half
            inv = torch.where(d != 0, 1 / d, 0.0)
            q = torch.trunc(x * inv[..., None] + (half + 0.5))  # inf for subnormal d: saturates
            return d, None, torch.nan_to_num(q, nan=float(half)).clamp(0, top)
        mn, mx = x.amin(-1), x.amax(-1)
        d = (mx - mn) / top
        inv = torch.where(d != 0, 1 / d, 0.0)
        q = torch.trunc((x - mn[..., None]) * inv[..., None] + 0.5)
        return d, mn, torch.nan_to_num(q, nan=0.0).clamp(0, top)

    def encode(self, x, qw, search):
        d, m, L = self._fit(x, qw, search)
        parts = [_f16_bytes(d)] + ([_f16_bytes(m)] if m is not None else [])
        if self.bits == 5:
            parts.append(_pack_bits((_u8(L) >> 4).unflatten(-1, (4, 8)).transpose(-1, -2), 1))
        parts.append(_pack_nibbles(L[..., :16], L[..., 16:]))
        return torch.cat(parts, -1)

    def decode(self, b):
        d = _f16_value(b[..., :2])[..., None]
        pos = 4 if self.affine else 2
        q = torch.cat([b[..., -16:] & 15, b[..., -16:] >> 4], -1)  # (..., 32)
        if self.bits == 5:
            qh = _unpack_bits(b[..., pos:pos + 4], 1, 8).transpose(-1, -2).flatten(-2)  # (..., 32)
            q = q | qh << 4
        if self.affine:
            return d * q.to(torch.float32) + _f16_value(b[..., 2:4])[..., None]
        return d * (q.to(torch.float32) - (1 << (self.bits - 1)))


class Q4_0(_Legacy):
    name, ggml_type, block, nbytes, bits, affine = "Q4_0", 2, 32, 18, 4, False


class Q4_1(_Legacy):
    name, ggml_type, block, nbytes, bits, affine = "Q4_1", 3, 32, 20, 4, True


class Q5_0(_Legacy):
    name, ggml_type, block, nbytes, bits, affine = "Q5_0", 6, 32, 22, 5, False


class Q5_1(_Legacy):
    name, ggml_type, block, nbytes, bits, affine = "Q5_1", 7, 32, 24, 5, True


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K low bits: (..., 256) -> (..., 64); byte 32h+l holds e = 128h + 32k + l at bits 2k."""
    return _pack_bits(L.unflatten(-1, (2, 4, 32)), 2).flatten(-2)


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    return _unpack_bits(qs.unflatten(-1, (2, 32)), 2, 4).flatten(-3)  # (..., 256)


def _requant(x: torch.Tensor, d: torch.Tensor, dm: torch.Tensor | None, L: torch.Tensor, lo: int,
             hi: int) -> torch.Tensor:
    """Re-round x (..., S, n) against decoded sub-block scales d (..., S) [and mins dm]; where a
    scale decodes to 0 the fitted codes L (already offset) stay, as upstream."""
    num = x if dm is None else x + dm[..., None]
    q = rint(num / d[..., None]).clamp(lo, hi) - lo
    return L + (q - L) * (d != 0)[..., None]


class Q2_K(BlockType):
    name, ggml_type, block, nbytes = "Q2_K", 10, 256, 84

    def encode(self, x, qw, search):
        xs = x.unflatten(-1, (16, 16))  # (R, NB, 16, 16)
        if qw is not None and search:
            w = qw.unflatten(-1, (16, 16)) * torch.sqrt(_row_sigma2(x, 1.0, False)[..., None] + xs * xs)
            scales, mins, L = make_qkx(xs, 3, w, -0.9, 0.05, 36, False)
            ws = w.sum(-1)  # both fits in one call (rows are independent): half the loop overhead
            (d, dmin), (ls, lm) = (v.unbind(0) for v in make_qp(torch.stack([scales, mins]), 15, torch.stack([ws, ws])))
        else:
            scales, mins, L = make_qkx(xs, 3, xs.abs(), -0.5, 0.1, 15 if search else 0, True)
            d, ls = _max_code(scales, 15)
            dmin, lm = _max_code(mins, 15)
        d, dmin = _f16_round(d), _f16_round(dmin)
        L = _requant(xs, d[..., None] * ls, dmin[..., None] * lm, L, 0, 3)
        sc = _u8(ls) | _u8(lm) << 4
        return torch.cat([sc, _pack_2bit(L.flatten(-2)), _f16_bytes(d), _f16_bytes(dmin)], -1)

    def decode(self, b):
        sc, d, dmin = b[..., :16], _f16_value(b[..., 80:82]), _f16_value(b[..., 82:84])
        dl = d[..., None] * (sc & 15).to(torch.float32)  # (..., 16)
        ml = dmin[..., None] * (sc >> 4).to(torch.float32)
        q = _unpack_2bit(b[..., 16:80]).unflatten(-1, (16, 16)).to(torch.float32)
        return (dl[..., None] * q - ml[..., None]).flatten(-2)


def _max_code(v: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference scale coding: super-scale max(v)/nmax, codes rint(v * nmax/max) in [0, nmax]."""
    mx = v.amax(-1).clamp(min=0.0)  # (...)
    inv = torch.where(mx > 0, nmax / mx, 0.0)
    return torch.where(mx > 0, mx / nmax, 0.0), rint(inv[..., None] * v).clamp(0, nmax)


class Q3_K(BlockType):
    name, ggml_type, block, nbytes = "Q3_K", 11, 256, 110

    def chunk_elements(self, weighted):
        return _ROW_CHUNK_ELEMENTS if weighted else 1 << 19  # make_q3 loops over elements per call

    def encode(self, x, qw, search):
        xs = x.unflatten(-1, (16, 16))
        if qw is not None and search:
            w = qw.unflatten(-1, (16, 16)) * torch.sqrt(_row_sigma2(x, 2.0, False)[..., None] + xs * xs)
            scales, L = make_qx(xs, 4, w)
            d, ls = make_qx(scales, 32, w.sum(-1))  # ls in [0, 64): signed scale + 32
        else:
            scales, L = make_q3(xs, 4, search)
            mx = signed_max(scales)  # (R, NB)
            inv = torch.where(mx != 0, -32 / mx, 0.0)
            ls = torch.where((mx != 0)[..., None], rint(inv[..., None] * scales).clamp(-32, 31) + 32, 0.0)
            d = torch.where(mx != 0, 1 / inv, 0.0)
        d = _f16_round(d)
        L = _requant(xs, d[..., None] * (ls - 32), None, L, -4, 3).flatten(-2)  # (R, NB, 256) in [0, 8)
        hmask = _pack_bits((L > 3).unflatten(-1, (8, 32)), 1)
        low = torch.where(L > 3, L - 4, L)
        lsb = _u8(ls)
        scale_bytes = torch.cat([_pack_nibbles(lsb[..., :8], lsb[..., 8:]),
                                 _pack_bits((lsb >> 4).unflatten(-1, (4, 4)), 2)], -1)
        return torch.cat([hmask, _pack_2bit(low), scale_bytes, _f16_bytes(d)], -1)

    def decode(self, b):
        sb = b[..., 96:108]
        low4 = torch.cat([sb[..., :8] & 15, sb[..., :8] >> 4], -1)  # (..., 16)
        high2 = _unpack_bits(sb[..., 8:12], 2, 4).flatten(-2)  # (..., 16): j = 4g + i
        sc = (low4 | high2 << 4).to(torch.float32) - 32
        dl = _f16_value(b[..., 108:110])[..., None] * sc  # (..., 16)
        hbit = _unpack_bits(b[..., :32], 1, 8).flatten(-2)  # (..., 256)
        q = _unpack_2bit(b[..., 32:96]).to(torch.float32) - 4 * (1 - hbit).to(torch.float32)
        return (dl[..., None] * q.unflatten(-1, (16, 16))).flatten(-2)


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins (..., 8) -> the 12-byte Q4_K/Q5_K field (§A.5 get_scale_min_k4)."""
    ls, lm = _u8(ls), _u8(lm)
    return torch.cat([ls[..., :4] | (ls[..., 4:] >> 4) << 6, lm[..., :4] | (lm[..., 4:] >> 4) << 6,
                      _pack_nibbles(ls[..., 4:], lm[..., 4:])], -1)


def _unpack_scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sc = torch.cat([s[..., :4] & 63, (s[..., 8:] & 15) | (s[..., :4] >> 6) << 4], -1)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:] >> 4) | (s[..., 4:8] >> 6) << 4], -1)
    return sc.to(torch.float32), mn.to(torch.float32)


class _QKx(BlockType):
    """Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins."""

    nmax = 15
    rmin, nstep = -1.0, 20

    def encode(self, x, qw, search):
        xs = x.unflatten(-1, (8, 32))  # (R, NB, 8, 32)
        if qw is not None and search:
            w = qw.unflatten(-1, (8, 32)) * torch.sqrt(_row_sigma2(x, 2.0, False)[..., None] + xs * xs)
            scales, mins, L = make_qkx(xs, self.nmax, w, -0.9, 0.05, 36, False)
            ws = w.sum(-1)  # both fits in one call (rows are independent): half the loop overhead
            (d, dmin), (ls, lm) = (v.unbind(0) for v in make_qp(torch.stack([scales, mins]), 63, torch.stack([ws, ws])))
        else:
            w = torch.sqrt((xs * xs).sum(-1, keepdim=True) / 32) + xs.abs()
            scales, mins, L = make_qkx(xs, self.nmax, w, self.rmin, 0.1, self.nstep if search else 0, False)
            d, ls = _max_code(scales, 63)
            dmin, lm = _max_code(mins, 63)
        d, dmin = _f16_round(d), _f16_round(dmin)
        L = _requant(xs, d[..., None] * ls, dmin[..., None] * lm, L, 0, self.nmax)  # (R, NB, 8, 32)
        parts = [_f16_bytes(d), _f16_bytes(dmin), _pack_scale_min_k4(ls, lm)]
        if self.nmax == 31:
            parts.append(_pack_bits(_u8(L) >> 4, 1))  # qh[l] bit j = 5th bit of sub-block j, elem l
        pairs = L.unflatten(-2, (4, 2))  # (R, NB, 4, 2, 32)
        parts.append(_pack_nibbles(pairs[..., 0, :], pairs[..., 1, :]).flatten(-2))
        return torch.cat(parts, -1)

    def decode(self, b):
        d, dmin = _f16_value(b[..., 0:2]), _f16_value(b[..., 2:4])
        sc, mn = _unpack_scale_min_k4(b[..., 4:16])
        qs = b[..., -128:].unflatten(-1, (4, 32))
        q = torch.stack([qs & 15, qs >> 4], -2).flatten(-3, -2)  # (..., 8, 32)
        if self.nmax == 31:
            q = q | _unpack_bits(b[..., 16:48], 1, 8) << 4
        dl = (d[..., None] * sc)[..., None]
        ml = (dmin[..., None] * mn)[..., None]
        return (dl * q.to(torch.float32) - ml).flatten(-2)


class Q4_K(_QKx):
    name, ggml_type, block, nbytes = "Q4_K", 12, 256, 144
    nmax, rmin, nstep = 15, -1.0, 20


class Q5_K(_QKx):
    name, ggml_type, block, nbytes = "Q5_K", 13, 256, 176
    nmax, rmin, nstep = 31, -0.5, 15


class Q6_K(BlockType):
    name, ggml_type, block, nbytes = "Q6_K", 14, 256, 210

    def encode(self, x, qw, search):
        xs = x.unflatten(-1, (16, 16))
        w = qw.unflatten(-1, (16, 16)).expand_as(xs) if qw is not None and search else None
        scales, L = make_qx(xs, 32, w, search)
        mx = signed_max(scales)  # (R, NB)
        zero = mx.abs() < 1e-15
        inv = torch.where(zero, 0.0, -128 / mx)
        d = _f16_round(torch.where(zero, 0.0, 1 / inv))
        ls = rint(inv[..., None] * scales).clamp(-128, 127)
        L = _requant(xs, d[..., None] * ls, None, L, -32, 31).flatten(-2)  # (R, NB, 256) in [0, 64)
        q = _u8(L).unflatten(-1, (2, 4, 32))  # (h, k, l)
        ql = torch.cat([_pack_nibbles(q[..., 0, :], q[..., 2, :]), _pack_nibbles(q[..., 1, :], q[..., 3, :])], -1)
        qh = _pack_bits(q >> 4, 2)  # (R, NB, 2, 32)
        out = torch.cat([ql.flatten(-2), qh.flatten(-2), ls.to(torch.int8).view(torch.uint8), _f16_bytes(d)], -1)
        return torch.where(zero[..., None], 0, out).to(torch.uint8)

    def decode(self, b):
        ql = b[..., :128].unflatten(-1, (2, 2, 32))  # (h, half, l)
        low = torch.stack([ql[..., 0, :] & 15, ql[..., 1, :] & 15, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], -2)
        high = _unpack_bits(b[..., 128:192].unflatten(-1, (2, 32)), 2, 4)  # (..., 2, 4, 32)
        q = (low | high << 4).flatten(-3).to(torch.float32) - 32  # (..., 256)
        sc = b[..., 192:208].contiguous().view(torch.int8).to(torch.float32)
        dl = _f16_value(b[..., 208:210])[..., None] * sc  # (..., 16)
        return (dl[..., None] * q.unflatten(-1, (16, 16))).flatten(-2)


BLOCK_TYPES: MappingProxyType[str, BlockType] = MappingProxyType(
    {t.name: t for t in (Q8_0(), Q4_0(), Q4_1(), Q5_0(), Q5_1(), Q2_K(), Q3_K(), Q4_K(), Q5_K(), Q6_K())}
)


def block_type(qtype: str) -> BlockType:
    """The BlockType named `qtype` (case-insensitive), or InfqError listing the choices."""
    t = BLOCK_TYPES.get(qtype.upper())
    if t is None:
        raise InfqError(f"GGML type {qtype!r} is not supported; use one of {', '.join(BLOCK_TYPES)}")
    return t


def quantize(weight: torch.Tensor, qtype: str, imatrix: torch.Tensor | None = None,
             search: bool = True) -> np.ndarray:
    """Encode weight (rows, n) as GGML `qtype` blocks -> uint8 (rows, n/block * type_size).

    imatrix: per-input-channel importance (mean x^2), shape (n,). search False: plain RTN baseline.
    The math runs on the weight's device (a CUDA weight encodes on the GPU, in bigger row chunks;
    float32 sums may then round differently in the last bit); the bytes come back to the host.
    """
    t = block_type(qtype)
    if weight.dim() != 2:
        raise InfqError(f"GGML quantization takes a 2-D weight, got shape {tuple(weight.shape)}; reshape it")
    rows, n = weight.shape
    if n % t.block:
        raise InfqError(f"row length {n} is not a multiple of {t.name}'s block of {t.block}; "
                        "use a fallback type (Q5_0/Q5_1/Q8_0 for 32-divisible rows, else F16)")
    x = weight.detach().to(dtype=torch.float32)  # on the weight's device
    if not bool(torch.isfinite(x).all()):
        raise InfqError("weight contains NaN or inf; fix or skip this tensor before quantizing")
    qw = None
    if imatrix is not None:
        qw = imatrix.detach().to(device=x.device, dtype=torch.float32).reshape(-1)
        if qw.numel() != n or not bool(torch.isfinite(qw).all()) or bool((qw < 0).any()):
            raise InfqError(f"importance matrix must hold {n} finite non-negative values (one per input "
                            f"channel), got {qw.numel()}; recompute it for this model")
        qw = qw.view(n // t.block, t.block)
    out = np.empty((rows, n // t.block * t.nbytes), dtype=np.uint8)
    chunk = t.chunk_elements(qw is not None and search) * (1 if x.device.type == "cpu" else 16)
    step = max(1, chunk // max(n, 1))
    for r0 in range(0, rows, step):  # row chunks bound memory; every block in a chunk is encoded at once
        xb = x[r0:r0 + step].view(-1, n // t.block, t.block)  # (R, NB, block)
        out[r0:r0 + step] = _encode_guarded(t, xb, qw, search).reshape(xb.shape[0], -1).cpu().numpy()
    return out


_TYPE_FOR_BITS = ((2, "Q2_K"), (3, "Q3_K"), (4, "Q4_K"), (5, "Q5_K"), (6, "Q6_K"), (8, "Q8_0"))


def quantize_kquant(weight: torch.Tensor, stats: LayerStats | None, config: QuantConfig,
                    qtype: str | None = None) -> QuantizedTensor:
    """The kquant method's pure function: weight (out, in) -> a "gguf:<type>" QuantizedTensor.

    `stats.sqmean` (per-input-channel mean x^2, the importance matrix) weights the scale fits when
    present. The GGML type is `qtype` (the per-tensor choice of a mix, see kquant_mix), else the
    K-type of `config.bits` (2..6 -> Q2_K..Q6_K, 8 -> Q8_0). Rows are encoded in the order given:
    the GGUF writer applies llama.cpp's Q/K row permutation to the bytes (rows are independent, so
    permuting bytes equals quantizing permuted rows).
    """
    qtype = qtype or dict(_TYPE_FOR_BITS).get(config.bits, "")
    imatrix = stats.sqmean if stats is not None else None
    data = quantize(weight, qtype, imatrix)  # uint8 (out, in / block * type_size)
    return QuantizedTensor.from_gguf(data, qtype, (int(weight.shape[0]), int(weight.shape[1])))


def _encode_guarded(t: BlockType, x: torch.Tensor, qw: torch.Tensor | None, search: bool) -> torch.Tensor:
    """The fitted encoding of x (R, NB, block), except per block where plain RTN decodes with a lower
    (imatrix-weighted) squared error. llama.cpp's fit can lose to RTN when one outlier sub-block
    sets the shared 6/4-bit min scale (e.g. Q4_K, a 1e4 entry among N(0,1)); this keeps the
    encoder never worse than the baseline. Costs one more RTN encode and two decodes; the errors
    are float32 sums (a block whose two errors agree to float32 precision may keep either)."""
    fitted = t.encode(x, qw, search)
    if not search:
        return fitted
    plain = t.encode(x, None, False)

    def err(b: torch.Tensor) -> torch.Tensor:
        d = t.decode(b) - x
        d = d * d
        return (d if qw is None else qw * d).sum(-1)  # (R, NB)

    return fitted + (plain - fitted) * (err(plain) < err(fitted))[..., None]  # uint8 wraps: exact


def dequantize(data: np.ndarray | torch.Tensor, qtype: str, n: int) -> torch.Tensor:
    """Decode GGML blocks (rows, n/block * type_size) uint8 -> float32 (rows, n)."""
    t = block_type(qtype)
    b = torch.as_tensor(np.asarray(data, dtype=np.uint8) if isinstance(data, np.ndarray) else data)
    if n % t.block or b.shape[-1] != n // t.block * t.nbytes:
        raise InfqError(f"{t.name} data of {b.shape[-1]} bytes per row does not hold {n} values; "
                        "the file's tensor shape or type is wrong")
    rows = b.shape[:-1]
    return t.decode(b.reshape(*rows, n // t.block, t.nbytes)).reshape(*rows, n)
