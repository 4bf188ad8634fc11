"""Fused small ops for the decoder block (Triton): RMSNorm (with the residual add folded in),
SiLU-gate multiply and neox-style rotary embedding, twins of `ref.rms_norm_ref`, `ref.silu_mul_ref`
and `ref.rotary_ref`.

Each is one pass over memory where PyTorch makes several (RMSNorm alone is a cast, a square, a
mean, an rsqrt, two multiplies and a cast back, each a kernel with its own round trip), so the gain
is bandwidth and launches at decode sizes. Arithmetic is fp32 inside and rounded once on the way
out, so results are at least as accurate as the reference's per-op rounding. Limits: the last
dimension must be contiguous; RMSNorm keeps a whole row in one program (C <= 65536); rotary needs
an even head dim with cos/sin tables of the full head dim (both halves equal, as `Rope` builds them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rms_norm_kernel(X, R, W, Out, H, stride_x, stride_r, stride_o, stride_h, n_cols, eps,
                     HAS_RES: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (rows,): h = x (+ r), written to H when HAS_RES; out = w * (h * rsqrt(mean(h^2) + eps))."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < n_cols
    h = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:  # the sum rounded to x's dtype, as the model adds (fp32 first: no bf16 arithmetic)
        hx = (h + tl.load(R + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + offs, hx, mask=mask)
        h = hx.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(h * h, 0) / n_cols + eps)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + offs, (h * rstd * w).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(G, U, Out, stride_g, stride_u, stride_o, n_cols, BLOCK: tl.constexpr):
    """Grid (rows, cdiv(F, BLOCK)): out = silu(g) * u."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    g = tl.load(G + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + offs, (g * tl.sigmoid(g) * u).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(X, C, S, Out, stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh, n_heads,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Grid (T, cdiv(H, BLOCK_H)): out = x * cos + rotate_half(x) * sin for BLOCK_H heads of token t."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HALF)
    hmask = offs_h[:, None] < n_heads
    cos = tl.load(C + t * stride_ct + offs_d).to(tl.float32)[None, :]  # (1, D/2); the halves are equal
    sin = tl.load(S + t * stride_st + offs_d).to(tl.float32)[None, :]
    base = X + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(base, mask=hmask, other=0.0).to(tl.float32)  # (BLOCK_H, D/2)
    x2 = tl.load(base + HALF, mask=hmask, other=0.0).to(tl.float32)
    obase = Out + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(obase, (x1 * cos - x2 * sin).to(Out.dtype.element_ty), mask=hmask)
    tl.store(obase + HALF, (x2 * cos + x1 * sin).to(Out.dtype.element_ty), mask=hmask)


def _rows(x: Tensor, name: str) -> Tensor:
    """(..., C) -> (N, C) view without copying; the rows may be strided, the columns must not."""
    if x.stride(-1) != 1:
        raise ValueError(f"{name} needs a contiguous last dimension")
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        raise ValueError(f"{name}'s leading dimensions must flatten without a copy") from None


def rms_norm(x: Tensor, weight: Tensor, eps: float,
             residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm over the last dim: x (..., C), weight (C,) -> (..., C) in x's dtype. With `residual`
    (..., C): h = x + residual is normalized and (out, h) returned (h is the next layer's residual)."""
    c = x.shape[-1]
    if weight.shape != (c,) or weight.stride(0) != 1:
        raise ValueError(f"weight must be a contiguous ({c},) tensor, got {tuple(weight.shape)}")
    if c > 65536:
        raise ValueError(f"rows of {c} > 65536 elements are not supported")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("residual must match x's shape and dtype")
    x2 = _rows(x, "x")  # (N, C)
    r2 = _rows(residual, "residual") if residual is not None else x2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    o2, h2 = out.view(-1, c), h.view(-1, c)
    block = triton.next_power_of_2(c)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, o2, h2, x2.stride(0), r2.stride(0), o2.stride(0),
                                         h2.stride(0), c, float(eps), HAS_RES=residual is not None,
                                         BLOCK_C=block, num_warps=min(16, max(1, block // 512)))
    return out if residual is None else (out, h)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up for gate/up (..., F) (e.g. the two halves of a fused gate_up projection)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must match, got {tuple(gate.shape)} {gate.dtype} / {tuple(up.shape)} {up.dtype}")
    g2, u2 = _rows(gate, "gate"), _rows(up, "up")  # (N, F)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    o2 = out.view(-1, gate.shape[-1])
    n, f = g2.shape
    block = min(4096, triton.next_power_of_2(max(f, 1)))
    if n and f:
        _silu_mul_kernel[(n, triton.cdiv(f, block))](g2, u2, o2, g2.stride(0), u2.stride(0), o2.stride(0), f,
                                                     BLOCK=block, num_warps=min(8, max(1, block // 256)))
    return out


def rotary_embedding(x: Tensor, cos: Tensor, sin: Tensor, sin_first_half_negated: bool = False) -> Tensor:
    """Neox rotary: x (T, H, D), cos/sin (T, D) -> x * cos + rotate_half(x) * sin (T, H, D) in x's dtype.
    `sin_first_half_negated`: sin is `runtime.model.Rope`'s table, whose first half holds -sin (its
    second half, +sin, is what the kernel reads then)."""
    if x.dim() != 3 or cos.shape != (x.shape[0], x.shape[2]) or sin.shape != cos.shape:
        raise ValueError(f"need x (T, H, D) and cos/sin (T, D), got {tuple(x.shape)}, {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    t, h, d = x.shape
    if d % 2 or (d // 2) & (d // 2 - 1):
        raise ValueError(f"head dim must be twice a power of two, got {d}")
    if x.stride(2) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError("x and cos/sin need a contiguous last dimension")
    if sin_first_half_negated:
        sin = sin[:, d // 2:]  # a view: the kernel reads d/2 values per row from its start
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_h = min(16, triton.next_power_of_2(h))
    if t and h:
        _rotary_kernel[(t, triton.cdiv(h, block_h))](x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0),
                                                     sin.stride(0), out.stride(0), out.stride(1), h,
                                                     HALF=d // 2, BLOCK_H=block_h, num_warps=4)
    return out
