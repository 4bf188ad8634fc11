"""The scale searches of llama.cpp's reference K-quant encoders, vectorized over blocks in torch.

Each function fits one scale (and for the asymmetric ones a min) per sub-block of `x (..., n)`,
following `ggml-quants.c` as described in reference §A.5.2: `make_qx` (symmetric, 19 candidate
inverse scales, weighted least squares), `make_q3` (symmetric with coordinate descent),
`make_qkx` (scale + min, a grid of candidates each refined by 2x2 weighted least squares; the
`qkx2`/`qkx3` variants differ only in their arguments) and `make_qp` (positive 6/4-bit sub-block
scales with weights, imatrix path). Candidates are evaluated all at once; the choice among them is
a short Python loop over candidates (not blocks) with llama.cpp's strict "better than the best so
far" rule, so ties resolve as upstream does. Sums run in float32 in torch's order, so results can
differ from llama.cpp in the last bit of a sum (and rarely in a code); the byte layout does not.
Non-finite intermediates (subnormal ranges overflow 1/range) are mapped to code 0.
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
    """The element of largest |x| along the last dim (first on ties) -> (...,)."""
    idx = x.abs().argmax(dim=-1, keepdim=True)
    return x.gather(-1, idx).squeeze(-1)


def _f32(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device)


def make_qx(x: torch.Tensor, nmax: int, w: torch.Tensor | None, search: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric fit, codes L in [0, 2*nmax) meaning L - nmax. x, w: (..., n) -> (scale (...), L).

    w None means weights x^2 (rmse_type 1). search False is plain RTN: scale = max / -nmax.
    """
    mx = signed_max(x)  # (...)
    zero = mx.abs() < GROUP_MAX_EPS
    steps = [0.0] + [float(s) for s in range(-9, 10) if s != 0]
    if not search:
        steps = [0.0]
    # -(nmax + 0.1f*is) / max, in float32 as upstream
    iscale = -(nmax + _f32([0.1], x) * _f32(steps, x)) / mx[..., None]  # (..., C)
    L = rint(iscale[..., None] * x[..., None, :]).clamp(-nmax, nmax - 1)  # (..., C, n)
    if not search:
        scale = torch.where(zero, 0.0, 1 / iscale[..., 0])
        return scale, torch.where(zero[..., None], 0.0, L[..., 0, :] + nmax)
    w = x * x if w is None else w
    wx = (w * x)[..., None, :]  # (..., 1, n)
    sumlx = (wx * L).sum(-1)  # (..., C)
    suml2 = (w[..., None, :] * L * L).sum(-1)  # (..., C)
    scale = torch.where(suml2[..., 0] > 0, sumlx[..., 0] / suml2[..., 0], 0.0)
    best = scale * sumlx[..., 0]
    pick = torch.zeros_like(mx, dtype=torch.long)
    for c in range(1, len(steps)):
        better = (suml2[..., c] > 0) & (sumlx[..., c] * sumlx[..., c] > best * suml2[..., c])
        pick = torch.where(better, c, pick)
        scale = torch.where(better, sumlx[..., c] / suml2[..., c], scale)
        best = torch.where(better, scale * sumlx[..., c], best)
    L = L.gather(-2, pick[..., None, None].expand(*pick.shape, 1, x.shape[-1])).squeeze(-2)
    scale = torch.where(zero, 0.0, torch.nan_to_num(scale))
    return scale, torch.where(zero[..., None], 0.0, L + nmax)


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
    return torch.where(zero, 0.0, scale), torch.where(zero[..., None], 0.0, L + nmax)


def make_qkx(x: torch.Tensor, nmax: int, w: torch.Tensor, rmin: float, rdelta: float, nstep: int,
             use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale + min fit: value = scale*L - the_min, L in [0, nmax], the_min >= 0.

    x, w: (..., n) -> (scale (...), the_min (...), L (..., n)). nstep 0 is plain min/max RTN.
    """
    mn = x.amin(-1).clamp(max=0.0)  # (...)
    mx = x.amax(-1)
    flat = mx <= mn
    rng = mx - mn
    sum_w = w.sum(-1)
    sum_x = (w * x).sum(-1)
    xm = x - mn[..., None]  # (..., n)

    def err(scale: torch.Tensor, mins: torch.Tensor, L: torch.Tensor, xx: torch.Tensor,
            ww: torch.Tensor) -> torch.Tensor:
        diff = scale[..., None] * L + mins[..., None] - xx  # (scale*L + min) - x, as upstream
        return (ww * (diff.abs() if use_mad else diff * diff)).sum(-1)

    iscale = nmax / rng
    scale = 1 / iscale
    L = rint(iscale[..., None] * xm).clamp(0, nmax)  # (..., n)
    mins = mn.clone()
    if nstep >= 1:
        best = err(scale, mins, L, x, w)
        steps = _f32([float(s) for s in range(nstep + 1)], x)
        num = (rmin + rdelta * steps) + nmax  # (C,) float32: (rmin + rdelta*is) + nmax
        isc = num / rng[..., None]  # (..., C)
        La = rint(isc[..., None] * xm[..., None, :]).clamp(0, nmax)  # (..., C, n)
        wl = w[..., None, :] * La
        sum_l = wl.sum(-1)
        sum_l2 = (wl * La).sum(-1)
        sum_xl = (wl * x[..., None, :]).sum(-1)
        D = sum_w[..., None] * sum_l2 - sum_l * sum_l
        ts = (sum_w[..., None] * sum_xl - sum_x[..., None] * sum_l) / D
        tm = (sum_l2 * sum_x[..., None] - sum_l * sum_xl) / D
        pos = tm > 0
        tm = torch.where(pos, 0.0, tm)
        ts = torch.where(pos, sum_xl / sum_l2, ts)
        cur = err(ts, tm, La, x[..., None, :], w[..., None, :])  # (..., C)
        pick = torch.full_like(mn, -1, dtype=torch.long)
        for c in range(nstep + 1):
            better = (D[..., c] > 0) & (cur[..., c] < best)
            pick = torch.where(better, c, pick)
            best = torch.where(better, cur[..., c], best)
            scale = torch.where(better, ts[..., c], scale)
            mins = torch.where(better, tm[..., c], mins)
        chosen = La.gather(-2, pick.clamp(min=0)[..., None, None].expand(*pick.shape, 1, x.shape[-1]))
        L = torch.where((pick >= 0)[..., None], chosen.squeeze(-2), L)
    scale = torch.where(flat, 0.0, torch.nan_to_num(scale))
    L = torch.where(flat[..., None], 0.0, L)
    return scale, -mins, L


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
