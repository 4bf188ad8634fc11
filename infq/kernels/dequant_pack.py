"""Load-time repacking of a `QuantizedTensor` into the layout of the Triton dequant-GEMM kernels.

`pack(qt)` runs once per linear when a checkpoint is loaded; `dequant_gemm.py` reads the result.
Layout (`TritonPacked`): the integer codes of row n, input channel k split into a low bit plane of
`bits_lo` bits and an optional high plane of `bits_hi` bits (1/2/4/8 each, so every plane packs a
whole number of codes, 32/bits, per int32 word: 3-bit = 2+1, 5-bit = 4+1, 6-bit = 4+2), code k of
a row at bits `bits*(k % per_word)` of word `k // per_word`, rows outermost, K zero-padded to a
multiple of 32. Per group: `scales (N, G)` (times `scales2 (N, G/sup)` for K-quant super-blocks),
and a zero point that is one constant (`offset_mode` 0), per group (`zeros`, mode 1), or a K-quant
min `zeros * mins2` subtracted after scaling (mode 2). FP8 e4m3 weights are one 8-bit plane of raw
bytes with a row scale. Act-order `g_idx` becomes a column permutation `perm` (int32 (K,)): codes
are stored with their groups contiguous and the kernel reads x[:, perm]. GGML blocks (Q8_0, Q4_0,
Q4_K, Q5_K, Q6_K) are decoded into the same planes and scale tensors, bit for bit the values of
llama.cpp's decoders (scales kept as their 6/8-bit codes times the fp16 super-block scale).
Limits: group sizes that are not multiples of 16 (of 32 for 1-bit codes) unless one group per row,
7-bit codes, and the other GGML types are refused by `supported`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from infq.quantizers.scheme import QuantizedTensor

# bits -> (low plane bits, high plane bits)
_PLANES = {1: (1, 0), 2: (2, 0), 3: (2, 1), 4: (4, 0), 5: (4, 1), 6: (4, 2), 8: (8, 0)}
GGML_TYPES = ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")
K_ALIGN = 32  # K is padded to a multiple of this: every plane then holds whole words


@dataclass(frozen=True, eq=False)
class TritonPacked:
    """A weight in the dequant-GEMM kernels' layout (see the module docstring). Shapes for
    (N, K) = shape, G groups, Kp = K rounded up to 32."""

    lo: Tensor  # int32 (N, Kp * bits_lo / 32)
    hi: Tensor | None  # int32 (N, Kp * bits_hi / 32)
    scales: Tensor  # (N, G) fp16/bf16/fp32, or uint8/int8 K-quant scale codes
    scales2: Tensor | None  # fp16 (N, G / sup): K-quant super-block scale d
    zeros: Tensor | None  # (N, G): fp16 zero points (mode 1) or uint8 K-quant min codes (mode 2)
    mins2: Tensor | None  # fp16 (N, G / sup): K-quant super-block min scale dmin (mode 2)
    perm: Tensor | None  # int32 (K,): column k of the packed weight is input channel perm[k]
    shape: tuple[int, int]  # (N, K) = (out, in)
    group_size: int  # input channels per group (K when G == 1)
    tile_group: int  # channels the kernel scales at once: divides group_size, a power of two >= 16
    bits_lo: int
    bits_hi: int
    fp8: bool  # codes are float8 e4m3 bytes
    offset_mode: int  # 0: w = (q - zero_const) * s; 1: w = (q - zeros) * s; 2: w = q * s - zeros * mins2
    zero_const: int
    sup: int  # groups per super-block (scales2/mins2); 1 if none
    scheme: str  # e.g. "int4 g128", "int3 g64 act-order", "fp8", "gguf:Q4_K"

    def tensors(self) -> dict[str, Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name in ("lo", "hi", "scales", "scales2", "zeros", "mins2", "perm")}

    def to(self, device: torch.device | str) -> TritonPacked:
        """The same packed weight with every tensor on `device`."""
        return replace(self, **{k: (v.to(device) if v is not None else None) for k, v in self.tensors().items()})

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads for the whole weight (codes, scales, zeros; perm excluded)."""
        return sum(t.numel() * t.element_size() for k, t in self.tensors().items() if t is not None and k != "perm")


def _pack_plane(q: Tensor, bits: int) -> Tensor:
    """q (N, K) integer codes < 2^bits -> int32 (N, Kp * bits / 32), code k at bits bits*(k % pw)."""
    n, k = q.shape
    pw = 32 // bits
    kp = -(-k // K_ALIGN) * K_ALIGN
    v = torch.zeros((n, kp), dtype=torch.int64, device=q.device)
    v[:, :k] = q.to(torch.int64) & ((1 << bits) - 1)
    v = v.view(n, kp // pw, pw) << (torch.arange(pw, device=q.device, dtype=torch.int64) * bits)
    words = v.sum(-1)  # (N, Kp / pw) in [0, 2^32)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _planes(q: Tensor, bits: int) -> tuple[Tensor, Tensor | None, int, int]:
    lo_bits, hi_bits = _PLANES[bits]
    lo = _pack_plane(q, lo_bits)
    hi = _pack_plane(q.to(torch.int32) >> lo_bits, hi_bits) if hi_bits else None
    return lo, hi, lo_bits, hi_bits


def _tile_group(groups: int, group_size: int) -> int:
    return 32 if groups == 1 else math.gcd(group_size, 128)


def supported(qt: QuantizedTensor) -> bool:
    """True if `pack(qt)` can lay this weight out for the Triton kernels."""
    kind = qt.scheme.kind
    if kind == "fp8":
        return True
    if kind.startswith("gguf:"):
        return qt.scheme.ggml_type in GGML_TYPES
    if kind != "int" or qt.scheme.bits not in _PLANES or qt.zeros is None:
        return False
    n_groups, k = qt.n_groups, qt.shape[1]
    if n_groups == 1:
        return True
    gs = k // n_groups
    if gs % 16 or n_groups * gs != k or gs % (32 // _PLANES[qt.scheme.bits][0]):
        return False  # the GEMV kernel scales whole words: a word's codes must share a group
    counts = torch.bincount(qt.g_idx.long(), minlength=n_groups)
    return bool((counts == gs).all())  # act-order: every group must still hold gs channels


def pack(qt: QuantizedTensor) -> TritonPacked:
    """Repack once at load time; ValueError if `supported(qt)` is False."""
    if not supported(qt):
        raise ValueError(f"the Triton dequant-GEMM cannot run scheme {qt.scheme} (group size must be a "
                         f"multiple of 16 or one per row, bits in {sorted(_PLANES)}, GGML types {GGML_TYPES})")
    if qt.scheme.kind == "fp8":
        return _pack_fp8(qt)
    if qt.scheme.kind.startswith("gguf:"):
        return _pack_gguf(qt)
    return _pack_int(qt)


def _pack_int(qt: QuantizedTensor) -> TritonPacked:
    n, k = qt.shape
    groups = qt.n_groups
    gs = k // groups if groups > 1 else k
    codes, perm = qt.codes, None
    if groups > 1:
        g = qt.g_idx.long()
        if not torch.equal(g, torch.arange(k, device=g.device) // gs):
            order = torch.argsort(g, stable=True)  # (K,): groups contiguous, channels in their order
            codes, perm = codes[:, order], order.to(torch.int32)
    lo, hi, lo_bits, hi_bits = _planes(codes, qt.scheme.bits)
    assert qt.zeros is not None
    z0 = int(qt.zeros.reshape(-1)[0]) if qt.zeros.numel() else 0
    uniform = bool((qt.zeros == z0).all())
    scheme = f"int{qt.scheme.bits} " + (f"g{gs}" if groups > 1 else "per-channel") + (" act-order" if perm is not None else "")
    return TritonPacked(lo=lo, hi=hi, scales=qt.scales.contiguous(), scales2=None,
                        zeros=None if uniform else qt.zeros.to(torch.float16).contiguous(), mins2=None, perm=perm,
                        shape=(n, k), group_size=gs, tile_group=_tile_group(groups, gs), bits_lo=lo_bits,
                        bits_hi=hi_bits, fp8=False, offset_mode=0 if uniform else 1, zero_const=z0 if uniform else 0,
                        sup=1, scheme=scheme)


def _pack_fp8(qt: QuantizedTensor) -> TritonPacked:
    n, k = qt.shape
    lo = _pack_plane(qt.codes.view(torch.uint8), 8)
    return TritonPacked(lo=lo, hi=None, scales=qt.scales.contiguous(), scales2=None, zeros=None, mins2=None,
                        perm=None, shape=(n, k), group_size=k, tile_group=_tile_group(1, k), bits_lo=8, bits_hi=0,
                        fp8=True, offset_mode=0, zero_const=0, sup=1, scheme="fp8")


def _f16(b: Tensor) -> Tensor:
    """(..., 2) little-endian bytes -> fp16 (...)."""
    return b.contiguous().view(torch.float16).squeeze(-1)


def _scale_min_k4(s: Tensor) -> tuple[Tensor, Tensor]:
    """The 12-byte Q4_K/Q5_K field (..., 12) -> 6-bit scales and mins (..., 8) uint8 (§A.5)."""
    sc = torch.cat([s[..., :4] & 63, (s[..., 8:] & 15) | (s[..., :4] >> 6) << 4], -1)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:] >> 4) | (s[..., 4:8] >> 6) << 4], -1)
    return sc, mn


def _nibbles_k(qs: Tensor) -> Tensor:
    """Q4_K/Q5_K qs (..., 128): chunk c low nibbles -> e = 64c + l, high -> 64c + 32 + l -> (..., 256)."""
    qs = qs.unflatten(-1, (4, 32))
    return torch.stack([qs & 15, qs >> 4], -2).flatten(-3)


def _decode_blocks(b: Tensor, qtype: str) -> dict:
    """Blocks (N, NB, bytes) -> codes (N, NB * block) and the scale fields, per GGML type (§A.5)."""
    n, nb = b.shape[:2]
    if qtype == "Q8_0":  # d, qs int8: w = d * q, stored as code q + 128 with zero 128
        codes = (b[..., 2:].view(torch.int8).to(torch.int32) + 128).to(torch.uint8)
        return dict(codes=codes.reshape(n, -1), bits=8, scales=_f16(b[..., :2]),
                    zero_const=128, mode=0)
    if qtype == "Q4_0":  # d, qs[16]: byte j low nibble -> e = j, high -> j + 16; w = d * (q - 8)
        qs = b[..., 2:]
        codes = torch.cat([qs & 15, qs >> 4], -1)
        return dict(codes=codes.reshape(n, -1), bits=4, scales=_f16(b[..., :2]), zero_const=8, mode=0)
    if qtype in ("Q4_K", "Q5_K"):  # d, dmin, scales[12], (qh[32]), qs[128]: w = d*sc*q - dmin*m
        sc, mn = _scale_min_k4(b[..., 4:16])
        q = _nibbles_k(b[..., -128:])  # (N, NB, 256)
        bits = 4
        if qtype == "Q5_K":  # bit j of qh[l] is the 5th bit of element l of sub-block j
            qh = b[..., 16:48]
            hb = (qh.unsqueeze(-2) >> torch.arange(8, dtype=torch.uint8, device=b.device)[:, None]) & 1  # (.., 8, 32)
            q, bits = q | (hb.flatten(-2) << 4), 5
        return dict(codes=q.reshape(n, -1), bits=bits, scales=sc.reshape(n, -1), scales2=_f16(b[..., 0:2]),
                    zeros=mn.reshape(n, -1), mins2=_f16(b[..., 2:4]), sup=8, mode=2)
    # Q6_K: ql[128], qh[64], scales[16] int8, d; e = 128h + 32k + l
    ql = b[..., :128].unflatten(-1, (2, 2, 32))  # (h, half, l)
    low = torch.stack([ql[..., 0, :] & 15, ql[..., 1, :] & 15, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], -2)
    qh = b[..., 128:192].unflatten(-1, (2, 32))  # (h, l)
    high = (qh.unsqueeze(-2) >> (2 * torch.arange(4, dtype=torch.uint8, device=b.device))[:, None]) & 3
    q = (low | high << 4).flatten(-3)  # (N, NB, 256) in [0, 64)
    return dict(codes=q.reshape(n, -1), bits=6, scales=b[..., 192:208].contiguous().view(torch.int8).reshape(n, -1),
                scales2=_f16(b[..., 208:210]), sup=16, zero_const=32, mode=0)


def _pack_gguf(qt: QuantizedTensor) -> TritonPacked:
    from infq.quantizers.kquants import block_type

    t = block_type(qt.scheme.ggml_type)
    n, k = qt.shape
    f = _decode_blocks(qt.codes.reshape(n, k // t.block, t.nbytes), t.name)
    lo, hi, lo_bits, hi_bits = _planes(f["codes"], f["bits"])
    gs = t.block // f.get("sup", 1)  # sub-block size: the scale group

    def c(key: str) -> Tensor | None:
        v = f.get(key)
        return None if v is None else v.contiguous()
    return TritonPacked(lo=lo, hi=hi, scales=c("scales"), scales2=c("scales2"), zeros=c("zeros"), mins2=c("mins2"),
                        perm=None, shape=(n, k), group_size=gs, tile_group=_tile_group(k // gs, gs),
                        bits_lo=lo_bits, bits_hi=hi_bits, fp8=False, offset_mode=f["mode"],
                        zero_const=f.get("zero_const", 0), sup=f.get("sup", 1), scheme=qt.scheme.kind)
