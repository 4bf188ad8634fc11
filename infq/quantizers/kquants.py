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
from infq.quantizers.kquant_fit import (
    f16_round,
    make_q3,
    make_qkx,
    make_qp,
    make_qx,
    rint,
    roundf,
    signed_max,
)
from infq.quantizers.scheme import QuantConfig, QuantizedTensor

if TYPE_CHECKING:
    from infq.quantizers.calibrate import LayerStats

# ---------------------------------------------------------------- block types

QK_K = 256
_ROW_CHUNK_ELEMENTS = 1 << 17  # rows encoded together: temporaries stay cache-sized (measured best on CPU)
_LOOP_CHUNK_ELEMENTS = 1 << 18  # for make_qkx's per-candidate loop: fewer calls, bigger ops (measured)


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float (...) -> its IEEE half bytes (..., 2), little-endian."""
    return v.to(torch.float16).unsqueeze(-1).contiguous().view(torch.uint8)


def _f16_value(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 -> float32 (...)."""
    return b.contiguous().view(torch.float16).squeeze(-1).to(torch.float32)


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

    def chunk_elements(self, weighted):
        return _LOOP_CHUNK_ELEMENTS

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
        d, dmin = f16_round(d), f16_round(dmin)
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
        return _ROW_CHUNK_ELEMENTS if weighted else 1 << 20  # make_q3 loops over elements per call

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
        d = f16_round(d)
        L = _requant(xs, d[..., None] * (ls - 32), None, L, -4, 3)  # (R, NB, 16, 16) in [0, 8)
        L = L.flatten(-2)
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

    def chunk_elements(self, weighted):
        return _LOOP_CHUNK_ELEMENTS

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
        d, dmin = f16_round(d), f16_round(dmin)
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
        d = f16_round(torch.where(zero, 0.0, 1 / inv))
        ls = rint(inv[..., None] * scales).clamp(-128, 127)
        L = _requant(xs, d[..., None] * ls, None, L, -32, 31)  # (R, NB, 16, 16) in [0, 64)
        L = L.flatten(-2)
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
