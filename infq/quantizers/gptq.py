"""GPTQ (Frantar et al., ICLR 2023): quantize a linear weight column by column, each rounding error
spread over the not-yet-quantized columns through the inverse Hessian of the layer's inputs.

`quantize_gptq(weight, stats, config)` follows IST-DASLab `gptq.py` / AutoGPTQ `fasterquant`
(reference §B.1, §A.1.6) in paper vocabulary: `H` = 2/n Σ x xᵀ from `LayerStats`, dead inputs
(H_ii = 0) zeroed, `percdamp · mean(diag H)` added to the diagonal, `Hinv` = upper Cholesky factor
of H⁻¹, lazy batch updates over blocks of 128 columns, min-max groups fitted on the error-updated
weights when a group is entered (or all upfront on the original order with `static_groups`),
act-order (`desc_act`) by decreasing diag(H) with AutoGPTQ's `g_idx`. Grids come from
`rtn.minmax_params` (fp16-exact scales), so `QuantizedTensor.dequantize()` is bit-for-bit the
weight the solver committed to and fed back as error. Deliberate differences from upstream:
  * `Hinv` is U = J·chol(J H J)⁻¹·J (J reverses the order): the factor upstream gets from
    cholesky(cholesky_inverse(cholesky(H)), upper=True), in two O(n³) steps instead of three,
    in float32 as upstream, and in place: a blocked Cholesky and triangular inverse write only
    the lower triangle of the (reversed) Hessian, whose strict upper triangle and a saved diagonal
    still hold H exactly (for the error report, for a retry with more damping, and to hand the
    caller its Hessian back bit for bit). No second (in, in) matrix is allocated, which at
    in = 5632 (TinyLlama's down_proj) is 121 MiB saved over a copy and 363 MiB over float64.
  * a failed Cholesky is not fatal: the damping is raised x10 (at most to 1.0) and reported in the
    info dict; only when 1.0 fails too is an InfqError raised.
  * a group that starts inside a 128-column block is fitted on the weights with that block's
    updates applied (upstream reads the stale copy; identical when group_size is a multiple of 128).
Limits: int min-max grids only (no MSE grid search); `weight` is never mutated, and `stats` is
the same when this returns (its Hessian serves as workspace during the call; not thread-safe).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from infq.errors import InfqError
from infq.quantizers.rtn import minmax_params, quantize_codes
from infq.quantizers.scheme import QuantConfig, QuantizedTensor, QuantScheme, check_group_size

if TYPE_CHECKING:  # calibrate imports the runtime; the solver only needs the attribute `hessian`
    from infq.quantizers.calibrate import LayerStats

BLOCKSIZE = 128  # columns per lazy batch update (the paper's B)
MAX_DAMP = 1.0  # last damping fraction tried before giving up


def quantize_gptq(
    weight: Tensor, stats: LayerStats, config: QuantConfig
) -> tuple[QuantizedTensor, dict[str, float]]:
    """GPTQ of weight (out, in) with H = stats.hessian (in, in) -> (QuantizedTensor, info).

    info: loss (Σ (w-q)²/d²/2 as upstream), damp (fraction finally used), damp_escalations, dead
    (inputs with H_ii = 0), err (tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), the relative output error on the
    calibration inputs).

    Memory: a float32 (in, in) Hessian without act-order serves as the workspace itself (reversed,
    factored and inverted in place in its lower triangle, then restored bit for bit before this
    returns), so the solve needs no second (in, in) buffer; with act-order or another dtype one
    float32 copy is made. Rows are solved a ROW_BYTES slice at a time, so only a slice of W is ever in float32.
    """
    H = _checked_inputs(weight, stats)  # (in, in) float32: stats.hessian itself when it already is
    scheme = QuantScheme.from_config(config)
    out, n = weight.shape
    gs = n // check_group_size(n, config.group_size)
    dead = torch.diagonal(H) == 0  # (in,)
    static = config.static_groups or config.group_size == -1  # -1: one grid per row, fitted upfront
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if config.desc_act else None
    inplace = perm is None and H is stats.hessian
    if perm is None:
        A = H if inplace else H.clone()
        _reverse_(A)  # (in, in) J H J
    else:
        rev = perm.flip(0)
        A = H[rev][:, rev]  # (in, in) J P H P J, a copy
    raw = torch.diagonal(A).clone()  # (in,) undamped diagonal, reversed processing order
    try:
        damp, escalations = _factor_inverse_(A, raw, config.damp_percent)
        col_group = torch.arange(n, device=H.device) // gs  # (in,) group of each processing position
        if static and perm is not None:
            col_group = perm // gs  # static groups keep the original columns' grids
        step = max(PANEL, ROW_BYTES // (4 * n))  # rows per slice: W in float32 stays ~ROW_BYTES
        codes = torch.empty(out, n, dtype=torch.uint8, device=weight.device)  # (out, in) original order
        scales = torch.empty(out, n // gs, dtype=torch.float32, device=weight.device)  # (out, G)
        zeros = torch.empty_like(scales)
        loss = 0.0
        for r in range(0, out, step):
            part = _solve_rows(weight[r : r + step], dead, perm, A, scheme, gs, col_group, static)
            codes[r : r + step], scales[r : r + step], zeros[r : r + step] = part[:3]
            loss += part[3]
            del part
        g_idx = col_group if perm is None else col_group[torch.argsort(perm)]
        qt = QuantizedTensor(
            codes=codes,
            scales=scales.to(torch.float16),  # exact: minmax_params returns fp16-representable scales
            zeros=zeros.to(torch.int32),
            g_idx=g_idx.to(torch.int32),
            scheme=scheme,
            shape=(out, n),
        )
        err = _relative_error(weight, qt, A, raw, perm)
    finally:
        if inplace:  # give the caller its Hessian back, bit for bit
            _restore_(A, raw)
            _reverse_(A)
    info = {
        "loss": loss,
        "damp": damp,
        "damp_escalations": float(escalations),
        "dead": float(int(dead.sum())),
        "err": err,
    }
    return qt, info


# Output rows are solved a slice at a time (rows are independent given H⁻¹): a float32 slice of W
# of at most ~ROW_BYTES (8 MiB: 372 rows of TinyLlama's down_proj, 1024 rows of a 2048-wide
# input), few enough slices that the per-column Python loop is not repeated often.
ROW_BYTES = 8 << 20
PANEL = 128  # block size of the in-place factorization and of the error report's row and column panels (transients of (in, PANEL) floats: 2.75 MiB at in = 5632)


def _checked_inputs(weight: Tensor, stats: LayerStats) -> Tensor:
    if weight.dim() != 2:
        raise InfqError(f"GPTQ quantizes 2-D (out, in) weights; got shape {tuple(weight.shape)}")
    hessian = getattr(stats, "hessian", None)
    if hessian is None:
        raise InfqError("no Hessian in the layer statistics; calibrate with method gptq before quantizing")
    n = weight.shape[1]
    if tuple(hessian.shape) != (n, n):
        raise InfqError(
            f"Hessian shape {tuple(hessian.shape)} does not match the weight's input dim {n}; "
            "pass the statistics collected for this linear"
        )
    H = hessian  # the same object when usable as is, so the solve can work in its memory
    if H.dtype != torch.float32 or H.device != weight.device or not H.is_contiguous() or H.requires_grad:
        H = H.detach().to(device=weight.device, dtype=torch.float32).contiguous()
    if not _finite(weight):
        raise InfqError("weight contains NaN or inf; fix or skip this module before quantizing")
    if not _finite(H):
        raise InfqError("Hessian contains NaN or inf; check the calibration data and the model's activations")
    if bool((torch.diagonal(H) < 0).any()):
        raise InfqError(
            "Hessian has negative diagonal entries, so it is not 2/n·Σxxᵀ; recollect the statistics"
        )
    return H


def _finite(t: Tensor) -> bool:
    """isfinite over row blocks: no full-size temporaries for an (in, in) Hessian."""
    return all(bool(torch.isfinite(t[r : r + PANEL]).all()) for r in range(0, t.shape[0], PANEL))


def _fit_groups(W: Tensor, gs: int, scheme: QuantScheme) -> tuple[Tensor, Tensor]:
    """Min-max grids of every group of gs original columns -> (scale, zero), each (out, G)."""
    out, n = W.shape
    return minmax_params(W.reshape(out, n // gs, gs), scheme.bits, scheme.sym)


def _reverse_(A: Tensor) -> None:
    """A <- J A J in place (J reverses the order): on a contiguous matrix, the flat reversal."""
    flat = A.view(-1)
    N = flat.numel()
    step = 1 << 20
    for a in range(0, N // 2, step):
        b = min(a + step, N // 2)
        low = flat[a:b].clone()
        flat[a:b] = flat[N - b : N - a].flip(0)
        flat[N - b : N - a] = low.flip(0)


def _restore_(A: Tensor, diag: Tensor) -> None:
    """Rebuild the symmetric matrix from A's strict upper triangle (never written) and `diag`."""
    n = A.shape[0]
    for k in range(0, n, PANEL):
        ke = min(k + PANEL, n)
        blk = A[k:ke, k:ke]
        blk.copy_(blk.triu(1) + blk.triu(1).T)
        A[ke:, k:ke] = A[k:ke, ke:].T
    torch.diagonal(A).copy_(diag)


def _factor_inverse_(A: Tensor, raw: Tensor, damp_percent: float) -> tuple[float, int]:
    """A's lower triangle <- L⁻¹ where L Lᵀ = A + damp·mean(diag)·I (dead diagonal entries -> 1).

    A holds J H J (J reverses the order), so U = J L⁻¹ J is the upper Cholesky factor of the damped
    H⁻¹ that GPTQ's column loop needs (H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J)), read through `_u`. Only the lower
    triangle is written, so a failed factorization is undone from the upper one and retried with
    the damping raised x10 (at most to 1.0); only when 1.0 fails too is an InfqError raised.
    Returns (damp used, escalations). float32 throughout, as upstream.
    """
    live = raw > 0
    mean = float(raw.mean())  # dead inputs count as 0 in the mean, as upstream (they are 1 after)
    damp, escalations = float(damp_percent), 0
    while True:
        torch.diagonal(A).copy_(torch.where(live, raw, torch.ones_like(raw)) + damp * mean)
        if _cholesky_lower_(A) and _invert_lower_(A):
            return damp, escalations
        if damp >= MAX_DAMP:
            raise InfqError(
                f"the damped Hessian is not positive definite even at damp {damp:g} (started at "
                f"{damp_percent:g}); check the calibration data (NaN, too few tokens) or raise --damp"
            )
        _restore_(A, raw)
        damp, escalations = min(damp * 10.0, MAX_DAMP), escalations + 1


def _cholesky_lower_(A: Tensor) -> bool:
    """Right-looking blocked Cholesky of A's lower triangle, in place; the strict upper triangle
    is left untouched. False if A is not positive definite (A is then partly overwritten)."""
    n = A.shape[0]
    for j in range(0, n, PANEL):
        je = min(j + PANEL, n)
        blk = A[j:je, j:je]
        L, info = torch.linalg.cholesky_ex(blk.tril() + blk.tril(-1).T)  # (b, b) lower
        if int(info) != 0 or not bool(torch.isfinite(L).all()):
            return False
        blk.copy_(L + blk.triu(1))
        if je == n:
            break
        P = torch.linalg.solve_triangular(L.T, A[je:, j:je], upper=True, left=False)  # (n-je, b) = A21 L⁻ᵀ
        A[je:, j:je] = P
        for k in range(je, n, PANEL):  # trailing update A22 -= P Pᵀ, lower part only
            ke = min(k + PANEL, n)
            pk = P[k - je : ke - je]  # (bk, b)
            A[k:ke, k:ke] -= (pk @ pk.T).tril()
            if ke < n:
                A[ke:, k:ke].addmm_(P[ke - je :], pk.T, alpha=-1.0)
    return True


def _invert_lower_(A: Tensor) -> bool:
    """A's lower triangle L <- L⁻¹ in place, block column by block column from the right:
    [[L11, 0], [L21, L22]]⁻¹ = [[L11⁻¹, 0], [-L22⁻¹ L21 L11⁻¹, L22⁻¹]]. Upper triangle untouched."""
    n = A.shape[0]
    starts = list(range(0, n, PANEL))
    for j in reversed(starts):
        je = min(j + PANEL, n)
        blk = A[j:je, j:je]
        eye = torch.eye(je - j, dtype=A.dtype, device=A.device)
        inv = torch.linalg.solve_triangular(blk.tril(), eye, upper=False)  # (b, b) L11⁻¹
        if not bool(torch.isfinite(inv).all()):
            return False
        if je < n:
            X = A[je:, j:je].clone()  # (m, b) L21
            Y = torch.empty_like(X)  # L22⁻¹ L21, with L22⁻¹ already in place below-right
            for k in range(je, n, PANEL):
                ke = min(k + PANEL, n)
                y = A[k:ke, k:ke].tril() @ X[k - je : ke - je]
                if k > je:
                    y.addmm_(A[k:ke, je:k], X[: k - je])
                Y[k - je : ke - je] = y
            A[je:, j:je] = -(Y @ inv)
        blk.copy_(inv + blk.triu(1))
    return True


def _u(A: Tensor, r0: int, r1: int, c0: int, c1: int) -> Tensor:
    """U[r0:r1, c0:c1] of U = J L⁻¹ J (upper) from L⁻¹ in A's lower triangle: a flipped copy."""
    n = A.shape[0]
    return A[n - r1 : n - r0, n - c1 : n - c0].flip(0, 1)


def _solve_rows(
    weight: Tensor, dead: Tensor, perm: Tensor | None, A: Tensor, scheme: QuantScheme, gs: int,
    col_group: Tensor, static: bool,
) -> tuple[Tensor, Tensor, Tensor, float]:
    """GPTQ of some rows (r, in) -> codes (r, in) original order, scales, zeros (r, G), loss."""
    W = weight.to(torch.float32, copy=True)  # (r, in)
    W[:, dead] = 0.0
    table = _fit_groups(W, gs, scheme) if static else None  # ((r, G), (r, G)) original order
    if perm is not None:
        W = W[:, perm]
    codes, scales, zeros, loss = _solve(W, A, scheme, gs, col_group, table)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, scales, zeros, loss


def _blocks(n: int, gs: int, fitted: bool) -> Iterator[tuple[int, int]]:
    """Lazy-batch blocks [i1, i2) of BLOCKSIZE columns; with groups fitted during the solve, a block
    is cut where a group starts that would end past it, so a group begins at a block start or lies
    inside one block (its fit then sees every earlier update)."""
    i1 = 0
    while i1 < n:
        i2 = min(i1 + BLOCKSIZE, n)
        last = (i2 - 1) // gs * gs  # last group start before i2
        if fitted and i1 < last and last + gs > i2:
            i2 = last
        yield i1, i2
        i1 = i2


def _solve(
    W: Tensor,
    A: Tensor,
    scheme: QuantScheme,
    gs: int,
    col_group: Tensor,
    table: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor, float]:
    """The GPTQ loop on W (out, n) in processing order, updated in place; U through `_u(A, ...)`.

    Returns codes (out, n) uint8 in processing order, scales and zeros (out, G) float32 (group g =
    table column g when static, else processing columns [g·gs, (g+1)·gs)) and the loss.
    """
    out, n = W.shape
    maxq = scheme.maxq
    codes = torch.empty(out, n, dtype=torch.uint8, device=W.device)  # (out, n)
    if table is None:
        scales = torch.empty(out, n // gs, dtype=torch.float32, device=W.device)  # (out, G)
        zeros = torch.empty_like(scales)
    else:
        scales, zeros = table
    groups = col_group.tolist()
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1, i2 in _blocks(n, gs, table is None):
        W1 = W[:, i1:i2].clone()  # (out, B) receives this block's updates column by column
        Err1 = torch.empty_like(W1)  # (out, B) (w - q) / d
        U1 = _u(A, i1, i2, i1, i2)  # (B, B), upper
        for i in range(i2 - i1):
            p = i1 + i
            if table is None and p % gs == 0:  # entering a group: fit on the updated weights
                src = W1[:, i : i + gs] if p + gs <= i2 else W[:, p : p + gs]  # (out, gs)
                scales[:, p // gs], zeros[:, p // gs] = minmax_params(src, scheme.bits, scheme.sym)
            scale, zero = scales[:, groups[p]], zeros[:, groups[p]]  # (out,)
            w = W1[:, i]  # (out,)
            c = quantize_codes(w, scale, zero, maxq)  # (out,) float
            codes[:, p] = c.to(torch.uint8)
            Err1[:, i] = (w - scale * (c - zero)) / U1[i, i]  # same product as dequantize()
            W1[:, i:].addr_(Err1[:, i], U1[i, i:], alpha=-1.0)  # OBS update of the block's rest
        loss += Err1.double().square().sum() / 2
        if i2 < n:
            W[:, i2:].addmm_(Err1, _u(A, i1, i2, i2, n), alpha=-1.0)  # lazy batch update of later columns
    return codes, scales, zeros, float(loss)


def _relative_error(weight: Tensor, qt: QuantizedTensor, A: Tensor, raw: Tensor, perm: Tensor | None) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) with ΔW = W - Q and the undamped H.

    H is read where the factorization never wrote: A's strict upper triangle and `raw` hold
    J P H P J exactly, so the quadratic forms run over the reversed (processing) column order,
    block by block, in float32 products summed in float64 (against a float64 evaluation this
    agrees to ~1e-6 relative). A diagnostic, not an input to the solve.
    """
    order = torch.arange(A.shape[0], device=A.device) if perm is None else perm
    rev = order.flip(0)
    num = den = 0.0
    for r in range(0, weight.shape[0], PANEL):  # a few rows at a time: small transients
        W = weight[r : r + PANEL].to(torch.float32)[:, rev]  # (r, in) reversed processing order
        D = W - qt.dequantize(rows=slice(r, r + PANEL))[:, rev]
        num += _quadratic(D, A, raw)
        den += _quadratic(W, A, raw)
    return num / den if den > 0 else 0.0


def _quadratic(X: Tensor, A: Tensor, diag: Tensor) -> float:
    """Σ_rows x S xᵀ for the symmetric S with strict upper triangle triu(A, 1) and diagonal `diag`,
    one full column panel of S at a time (rebuilt from the upper triangle), so every entry of X·S
    is one full-length float32 dot product, as X @ S would compute it."""
    n = A.shape[0]
    total = 0.0
    for c in range(0, n, PANEL):
        ce = min(c + PANEL, n)
        blk = A[c:ce, c:ce].triu(1)
        panel = torch.cat((A[:c, c:ce], blk + blk.T + torch.diag(diag[c:ce]), A[c:ce, ce:].T))  # (n, b)
        total += float(((X @ panel) * X[:, c:ce]).sum(dtype=torch.float64))
    return total
