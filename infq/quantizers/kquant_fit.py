"""The scale fits of llama.cpp's reference K-quant encoders, vectorized over blocks in torch.

Each fit takes sub-blocks `x (..., n)` and returns one scale (and for the asymmetric ones a min)
per sub-block, following `ggml-quants.c` as described in reference §A.5.2: `make_qx` (symmetric,
19 candidate inverse scales, weighted least squares), `make_q3` (symmetric with coordinate
descent), `make_qkx` (scale + min: a grid of candidates, each refined by 2x2 weighted least
squares; the `qkx2`/`qkx3` variants differ only in their arguments) and `make_qp` (positive
6/4-bit sub-block scales with weights, imatrix path).

make_qx's grid is scored without materializing (sub-blocks, candidates, n) codes: along the grid
an element's code rint(isc_c * x) is monotone in c and moves by at most two steps (the grid spans
< 2 code units), so every candidate's Σw·L², Σw·x·L is the sum under the first candidate plus a
cumsum over a histogram of the candidates where codes step (`_code_steps`, `_candidate_sums`):
O(n + C) per sub-block instead of O(n·C), the codes exactly those of the straightforward search
(tests/quantizers/test_kquants.py keeps it as the oracle); the sums are float64, so the pick is the
truly best candidate (the float32 search can mis-order candidates whose errors agree to ~1e-6).
make_qkx cannot take that shortcut: upstream rounds each candidate against the min of the best
fit so far, so its candidates run in sequence (each one vectorized over every sub-block).

A refinement after the fit (alternating least squares on the coded block scales and codes,
keeping a block's result where its imatrix-weighted error dropped) was tried and left out: it cut
that error 0.5-15 % below upstream's, yet raised the demo model's perplexity (Q4_K_M with imatrix
38.967 -> 38.995, Q3_K_M 39.194 -> 39.262): the weighted weight error is not what perplexity follows
at that scale, so the encoders stay with upstream's fit.

Non-finite intermediates (subnormal ranges overflow 1/range) are mapped to code 0; rows whose
grid is not finite never take a candidate.
"""

from __future__ import annotations

import torch

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
    """The element of largest |x| along the last dim (first on ties) -> (...,).

    From the max and the min (reduced over a transposed copy: torch's reductions over a short last
    dim are slow); only rows where max == -min != 0 need the first index, found on that subset."""
    xt = x.reshape(-1, x.shape[-1]).t().contiguous()  # (n, M)
    mx, mn = xt.amax(0), xt.amin(0)
    out = torch.where(-mn > mx, mn, mx)
    tie = (mx == -mn) & (mx != 0)
    if bool(tie.any()):
        rows = tie.nonzero().squeeze(-1)
        sub = x.reshape(-1, x.shape[-1])[rows]
        out[rows] = sub.gather(-1, sub.abs().argmax(-1, keepdim=True)).squeeze(-1)
    return out.reshape(x.shape[:-1])


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


def _candidate_sums(isc: torch.Tensor, x: torch.Tensor, w: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Σw·L², Σw·x·L (float64) for every candidate's codes L = clamp(rint(isc * x), lo, hi):
    isc (M, C); x, w (M, n) -> (M, 2, C).

    O(n + C) per row: the sums under candidate 0 plus a histogram of the steps over candidates,
    accumulated with a cumsum (see `_code_steps`).
    """
    M, C = isc.shape
    L0, sgn, steps = _code_steps(isc, x, lo, hi)
    w64, L64 = w.double(), L0.double()
    wx, wl = w64 * x.double(), w64 * L64
    base = torch.stack([(wl * L64).sum(-1), (wx * L64).sum(-1)])  # (2, M)
    hist = torch.zeros(2, M, C + 1, dtype=torch.float64, device=x.device)
    if steps:
        s64 = sgn.double()
        wxs, twols = wx * s64, wl.mul_(s64).mul_(2)
        for j, c in enumerate(steps, 1):  # step j: L -> L0 + sgn*j, so L^2 grows by 2*sgn*L0 + 2j - 1
            hist[0].scatter_add_(-1, c, twols.add(w64, alpha=2 * j - 1))
            hist[1].scatter_add_(-1, c, wxs)
    sums = hist.cumsum_(-1)[..., :C]  # (2, M, C)
    sums.add_(base[..., None])
    return sums.transpose(0, 1)  # (M, 2, C)


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
    steps = torch.arange(-9, 10, dtype=torch.float32, device=x.device)  # ascending: monotone inverse scales
    # -(nmax + 0.1f*is) / max, in float32 as upstream; zero rows get a harmless stand-in max
    isc = -(nmax + _f32([0.1], x) * steps) / torch.where(zero, 1.0, mx).reshape(-1, 1)  # (M, 19)
    sums = _candidate_sums(isc, x.reshape(-1, n), w.expand_as(x).reshape(-1, n), -nmax, nmax - 1)
    suml2, sumlx = sums[:, 0], sums[:, 1]  # (M, 19)
    gain = torch.where(suml2 > 0, sumlx * sumlx / suml2, 0.0)
    # the first best in upstream's candidate order 0, -9..-1, 1..9: argmax gives the first best by
    # index, and candidate 0 (index 9) goes ahead of it when it ties
    pick = gain.argmax(-1, keepdim=True)  # (M, 1)
    pick = torch.where(gain[:, 9:10] >= gain.gather(-1, pick), 9, pick)
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
    n = x.shape[-1]
    xt = x.reshape(-1, n).t().contiguous()  # (n, M): element i of every sub-block is one contiguous row
    wt = xt * xt
    wxt = wt * xt
    Lt = L.reshape(-1, n).t().contiguous()
    sumlx = (wxt * Lt).sum(0)
    suml2 = (wt * Lt * Lt).sum(0)
    for _ in range(5):  # a pass that changes nothing leaves the state as is, so 5 passes == upstream
        for i in range(n):
            wi, wxi, li = wt[i], wxt[i], Lt[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new_l = rint(xt[i] * sl2 / slx).clamp_(-nmax, nmax - 1)
            slx2 = slx + wxi * new_l
            sl22 = sl2 + wi * new_l * new_l
            ok = (slx > 0) & (new_l != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            Lt[i] = torch.where(ok, new_l, li)
            sumlx = torch.where(ok, slx2, sumlx)
            suml2 = torch.where(ok, sl22, suml2)
    L = Lt.t().reshape(x.shape)
    sumlx, suml2 = sumlx.reshape(x.shape[:-1]), suml2.reshape(x.shape[:-1])
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return torch.where(zero, 0.0, scale), (L + nmax) * ~zero[..., None]


def make_qkx(x: torch.Tensor, nmax: int, w: torch.Tensor, rmin: float, rdelta: float, nstep: int,
             use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale + min fit: value = scale*L - the_min, L in [0, nmax], the_min >= 0.

    x, w: (..., n) -> (scale (...), the_min (...), L (..., n)). nstep 0 is plain min/max RTN.
    Upstream's make_qkx2/3_quants: start from min/max, then for each candidate inverse scale
    (rmin + rdelta*is + nmax) / (max - min), in order, round against the *current* best min, fit
    scale and min by weighted least squares (min <= 0) and keep it when its weighted squared
    (use_mad: absolute) error is lower. The current min moves with every improvement, so the
    candidates run in sequence, each one vectorized over every sub-block.
    """
    mn = x.amin(-1).clamp(max=0.0)  # (...)
    mx = x.amax(-1)
    flat = mx <= mn
    mins = torch.where(flat, -1.0, mn)  # flat rows get a harmless stand-in range (reset below)
    iscale = nmax / (mx - mins)
    scale = 1 / iscale
    L = (iscale[..., None] * (x - mins[..., None])).round_().clamp_(0, nmax)  # (..., n)

    def error(s: torch.Tensor, m: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        d = codes * s[..., None]
        d.add_(m[..., None]).sub_(x)  # (scale*L + min) - x, as upstream
        d = d.abs_() if use_mad else d.square_()
        return d.mul_(w).sum(-1)

    if nstep >= 1:
        best = error(scale, mins, L)
        wx = w * x
        sum_w, sum_x = w.sum(-1), wx.sum(-1)
        sum_x2 = (wx * x).sum(-1).double() if not use_mad else None
        rmin32, rdelta32 = _f32([rmin], x), _f32([rdelta], x)
        best_isc, best_at = iscale, mins  # L = rint(best_isc * (x - best_at)), rebuilt at the end
        for step in range(nstep + 1):
            isc = ((rmin32 + rdelta32 * step) + nmax) / (mx - mins)  # float32, as upstream
            La = (x - mins[..., None]).mul_(isc[..., None]).round_().clamp_(0, nmax)
            wl = w * La
            sum_l, sum_l2, sum_xl = wl.sum(-1), wl.mul_(La).sum(-1), (wx * La).sum(-1)
            D = sum_w * sum_l2 - sum_l * sum_l
            ts = (sum_w * sum_xl - sum_x * sum_l) / D
            tm = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = tm > 0
            tm = torch.where(pos, 0.0, tm)
            ts = torch.where(pos, sum_xl / sum_l2, ts)
            if use_mad:
                cur = error(ts, tm, La)
            else:  # the squared error from the sums, in float64 (the kept float32 scale and min)
                s, m = ts.double(), tm.double()
                cur = (s * (s * sum_l2 + 2 * m * sum_l - 2 * sum_xl) + m * (m * sum_w - 2 * sum_x) + sum_x2).float()
            better = (D > 0) & (cur < best)  # NaN errors (no fit) never win
            best = torch.where(better, cur, best)
            scale = torch.where(better, ts, scale)
            best_isc, best_at = torch.where(better, isc, best_isc), torch.where(better, mins, best_at)
            mins = torch.where(better, tm, mins)
        L = (x - best_at[..., None]).mul_(best_isc[..., None]).round_().clamp_(0, nmax)
    scale = torch.where(flat, 0.0, torch.nan_to_num(scale))
    return scale, torch.where(flat, -mn, -mins), L * ~flat[..., None]


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


def f16_round(v: torch.Tensor) -> torch.Tensor:
    """The float32 value of v stored as IEEE half."""
    return v.to(torch.float16).to(torch.float32)

