"""Kernel dispatch: (scheme, device, compute dtype) -> the implementation of one quantized linear.

`prepare(qt, device, dtype)` repacks a `QuantizedTensor` once, at load time, into the layout of the
kernel that will run it and returns a `Kernel` (`kernel(x, bias) -> y`, plus its `name` and
resident `nbytes`). The choices:

CPU, bfloat16 activations (PyTorch's own kernels; their float32/float16 activation paths are scalar
loops 14-35x slower than their bfloat16 ones on AVX-512 machines, so they are not used):
  * "int8pack" - `aten._weight_int8pack_mm`: per-channel 8-bit whose codes minus zero points fit
    int8 (every symmetric 8-bit tensor): `y = x @ (c * s)ᵀ`, one bfloat16 scale per row.
  * "int4pack" - `aten._weight_int4pack_mm_for_cpu`: every other group-affine weight of 1..8 bits
    with groups of a multiple of 32 (GPTQ/AWQ/compressed-tensors int, and GGUF Q4_0, Q4_1, Q5_0,
    Q5_1, Q8_0, Q4_K, Q5_K). The kernel computes `w = (q - 8) * s + z` per group of 32/64/128/256
    with a float `z` (a value offset, not an integer code): `(q - zero) * s` becomes codes
    `q + 8 - c` (c the middle code, 2^(bits-1)), `s` and `z = (c - zero) * s`, exact in float32;
    codes of 5..8 bits are split into two 4-bit planes (`q = 16 h + l`) laid side by side along K
    and read against `[x, x]`: one call, one fp32 accumulation. Act-order (`g_idx` not sorted) permutes W's columns here and x's per call.
    Rows are padded to a multiple of 16 (the kernel's rule).
  * "dense" - everything else (Q2_K, Q3_K, Q6_K with their 16-wide sub-blocks, odd group sizes),
    and every float32/float16 model: the weight dequantized once to the compute dtype and `linear`
    (F.linear; a single bf16/fp16 row through ATen's GEMV rather than oneDNN, twice the bandwidth on
    an EPYC). Serving loads then call `DenseKernel.pack`: a bfloat16 weight is reordered once into
    oneDNN's blocked layout (`onednn_pack`), which beats both at every M on a Xeon.
    In float32 this is exact (the reference decoder's values) but costs 4 bytes per weight.
CUDA: the Triton dequant-GEMM (`kernels.dequant_gemm`, imported on first use) where it supports the
scheme, else "dense" in the compute dtype. FP8 linears (runtime `Fp8Linear`) use the
`torch._scaled_mm` path below on GPUs with FP8 tensor cores and `ref.fp8_linear_ref` elsewhere.

Precision: the packed CPU paths round x, the scales/offsets and y to bfloat16 and accumulate in
float32, as `F.linear` in bfloat16 rounds x, W and y; tests/kernels/test_dispatch.py bounds their
error against the float64 oracle by that of PyTorch's bfloat16 matmul over the dequantized weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from infq.kernels.ref import quantize_act
from infq.quantizers.scheme import QuantizedTensor

INT4_GROUPS = (256, 128, 64, 32)  # group sizes `_weight_int4pack_mm_for_cpu` accepts
INT4_ROWS = 16  # its output rows (N) must be a multiple of this
INT4_PACK_BLOCK = 64  # the packed layout interleaves rows within blocks of 64 (measured: row-local beyond)


class Kernel(Protocol):
    name: str
    nbytes: int  # resident bytes of the repacked weight

    def __call__(self, x: Tensor, bias: Tensor | None = None) -> Tensor: ...


# ------------------------------------------------------------------ a common affine form

@dataclass(frozen=True)
class Affine:
    """w[:, perm[k]] = codes[:, k] * scale[:, k // group] + offset[:, k // group] (perm None: identity).

    codes uint8 (N, K) in [0, 2^bits); scale, offset float32 (N, K // group), exact for every source
    (fp16 scales times small integers)."""

    codes: Tensor
    scale: Tensor
    offset: Tensor
    group: int
    bits: int
    perm: Tensor | None = None  # int64 (K,)


def affine_from_int(qt: QuantizedTensor) -> Affine | None:
    """Kind "int" -> Affine; act-order groups become contiguous through a column permutation.
    None if the groups are not of equal size (no contiguous layout exists)."""
    assert qt.zeros is not None
    n, k = qt.shape
    groups = qt.n_groups
    if k % groups:
        return None
    group = k // groups
    contiguous = (torch.arange(k, device=qt.g_idx.device) // group).to(torch.int32)  # (K,)
    perm, codes = None, qt.codes
    if not torch.equal(qt.g_idx, contiguous):
        perm = torch.argsort(qt.g_idx, stable=True)  # (K,) channels grouped, each group in order
        if not torch.equal(qt.g_idx[perm], contiguous):
            return None
        codes = codes[:, perm]
    scale = qt.scales.to(torch.float32)  # (N, G)
    return Affine(codes, scale, -qt.zeros.to(torch.float32) * scale, group, qt.scheme.bits, perm)


def _f16(b: Tensor) -> Tensor:
    """(..., 2) uint8 little-endian halves -> float32 (...)."""
    return b.contiguous().view(torch.float16)[..., 0].to(torch.float32)


def _nibbles32(qs: Tensor) -> Tensor:
    """GGML's legacy 16-byte nibble field (..., 16) -> codes (..., 32): low nibbles then high."""
    return torch.cat([qs & 15, qs >> 4], -1)


def affine_from_gguf(qt: QuantizedTensor) -> Affine | None:
    """GGML blocks -> Affine for the types with one scale and offset per 32 values; None otherwise.
    Byte layouts as gguf-py's decoders read them (reference §A.5)."""
    t = qt.scheme.ggml_type
    n, k = qt.shape
    sizes = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q4_K": 144, "Q5_K": 176}
    if t not in sizes:
        return None
    b = qt.codes.reshape(n, -1, sizes[t])  # (N, NB, bytes)
    d = _f16(b[..., 0:2])[..., None]  # (N, NB, 1)
    if t == "Q8_0":
        q = (b[..., 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)  # (N, NB, 32)
        return _affine_blocks(q, d, -128 * d, 8)
    if t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        q = _nibbles32(b[..., -16:])  # (N, NB, 32)
        pos = 2 if t.endswith("_0") else 4
        if t.startswith("Q5"):
            qh = b[..., pos:pos + 4].contiguous().view(torch.int32)  # (N, NB, 1): bit j = 5th bit of value j
            shifts = torch.arange(32, dtype=torch.int32, device=b.device)
            q = q | (((qh >> shifts) & 1) << 4).to(torch.uint8)
        bits = 4 if t.startswith("Q4") else 5
        off = _f16(b[..., 2:4])[..., None] if t.endswith("_1") else -(1 << (bits - 1)) * d
        return _affine_blocks(q, d, off, bits)
    dmin = _f16(b[..., 2:4])[..., None]  # Q4_K / Q5_K: 8 sub-blocks of 32, 6-bit scales and mins
    s = b[..., 4:16]
    sc = torch.cat([s[..., :4] & 63, (s[..., 8:] & 15) | (s[..., :4] >> 6) << 4], -1).to(torch.float32)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:] >> 4) | (s[..., 4:8] >> 6) << 4], -1).to(torch.float32)
    qs = b[..., -128:].unflatten(-1, (4, 32))  # (N, NB, 4, 32): byte l of pair j holds sub-blocks 2j, 2j+1
    q = torch.stack([qs & 15, qs >> 4], -2).flatten(-3, -2)  # (N, NB, 8, 32)
    if t == "Q5_K":
        hb = b[..., 16:48]  # (N, NB, 32): bit j of byte l = 5th bit of sub-block j, element l
        shifts = torch.arange(8, dtype=torch.uint8, device=b.device)
        q = q | ((hb[..., None, :] >> shifts[:, None]) & 1) << 4
    bits = 4 if t == "Q4_K" else 5
    return _affine_blocks(q.flatten(-3, -2), (d * sc).flatten(-2)[..., None], (-dmin * mn).flatten(-2)[..., None], bits)


def _affine_blocks(q: Tensor, scale: Tensor, offset: Tensor, bits: int) -> Affine:
    """q (N, NB, 32) codes, scale/offset (N, NB, 1) -> Affine with groups of 32."""
    n = q.shape[0]
    return Affine(q.reshape(n, -1).contiguous(), scale.reshape(n, -1), offset.reshape(n, -1), 32, bits)


def affine_from(qt: QuantizedTensor) -> Affine | None:
    if qt.scheme.kind == "int":
        return affine_from_int(qt)
    if qt.scheme.kind.startswith("gguf:"):
        return affine_from_gguf(qt)
    return None


# ------------------------------------------------------------------ CPU kernels

_HALF = (torch.bfloat16, torch.float16)


def linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, except that a single row of bfloat16/float16 on a CPU goes through ATen's own
    GEMV (fp32 accumulation, vectorized, split over threads) instead of oneDNN: on an AVX-512 CPU
    that streams the weight at 38-45 GB/s against oneDNN's 21-26 (bench/dense_gemv.py). oneDNN
    keeps every product of two or more rows, where it is the faster of the two."""
    if x.dtype in _HALF and x.device.type == "cpu" and x.numel() == x.shape[-1] and torch._C._get_mkldnn_enabled():
        torch._C._set_mkldnn_enabled(False)  # the flag is read per call; restored at once
        try:
            return F.linear(x, w, bias)
        finally:
            torch._C._set_mkldnn_enabled(True)
    return F.linear(x, w, bias)


def onednn_pack(w: Tensor) -> Tensor | None:
    """A bfloat16 or float32 `w` (N, K) reordered once into oneDNN's blocked layout for
    `packed_linear`, what inductor's weight freezing does: given a plain weight, oneDNN reorders it
    at every call, and the unpacked kernels stream several rows far slower than one.
    bench/dense_gemv.py on a 2-core Xeon that streams 26-31 GB/s, GB/s of weight read at M = 1 / 5 / 16:
    bf16 plain oneDNN 15.8 / 12.8 / 6.2, ATen 14.4 at M = 1, packed 23.3 / 18.8 / 8.7; fp32 MKL
    31.6 / 14.3 / 12.3, packed 31.4 / 25.1 / 15.8 (and 1.1-1.3x MKL's GFLOP/s at M = 32-512). Packed
    fp32 sums in another order than MKL: its error against float64 is 2-4x MKL's (mean 4.3e-7 vs
    1.7e-7 relative at K = 2048), within the a-priori bound of any fp32 dot product. Not float16
    (no gain there). None where this does not apply (not a CPU tensor, another dtype, no oneDNN in
    this PyTorch, or a oneDNN without a kernel for the dtype). The packed tensor is opaque: no
    indexing, no serialization."""
    if (w.device.type != "cpu" or w.dtype not in (torch.bfloat16, torch.float32) or w.dim() != 2
            or not torch.backends.mkldnn.is_available()):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)
    except RuntimeError:  # a CPU whose oneDNN has no kernel for this dtype
        return None


PLAIN_KEEP_BELOW = 1 << 20  # float32 weights with fewer elements keep their plain copy when packed
PLAIN_MAX_ROWS = 8  # ... and up to this many rows use it


def keeps_plain(w: Tensor) -> bool:
    """Whether a float32 weight packed by `onednn_pack` also keeps its plain copy, which F.linear
    (MKL) then uses for up to PLAIN_MAX_ROWS rows. oneDNN's packed call costs about 17 µs more per
    call than MKL's on the Xeon, which only small weights notice: demo-sized ones (512x256 ..
    1536x256) take 9-19 µs through F.linear against 26-33 packed at one row, 15-36 against 32-48 at
    eight, while from 4096x256 up the packed call is ahead from 5 rows and its fixed cost is small
    next to the weight's read. Below 2^20 elements the copy costs at most 4 MB per weight (a 1B
    model's largest weights are all above it)."""
    return w.dtype == torch.float32 and w.numel() < PLAIN_KEEP_BELOW


def use_packed(x: Tensor, packed: Tensor | None, plain: Tensor | None) -> bool:
    """Whether x (..., K) goes through the packed weight: there is one, and either no plain copy
    was kept (`keeps_plain`) or x has more than PLAIN_MAX_ROWS rows."""
    return packed is not None and (plain is None or x.numel() > PLAIN_MAX_ROWS * x.shape[-1])


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear over a weight from `onednn_pack`, computed in the weight's dtype; y in x's dtype."""
    dt = packed.dtype
    y = torch.ops.mkldnn._linear_pointwise(x.to(dt).contiguous(), packed, None if bias is None else bias.to(dt),
                                           "none", [], "")
    return y if x.dtype == dt else y.to(x.dtype)  # (..., N)


class DenseKernel:
    """The weight dequantized once to the compute dtype; F.linear per call, or oneDNN over a
    blocked copy after `pack()` (serving on a CPU)."""

    def __init__(self, qt: QuantizedTensor, device: torch.device, dtype: torch.dtype, name: str = "dense") -> None:
        self.name = name
        self.weight = qt.dequantize(torch.float32).to(device, dtype)  # (N, K)
        self.nbytes = self.weight.numel() * self.weight.element_size()
        self.packed: Tensor | None = None

    def pack(self) -> bool:
        """Replace the weight by its `onednn_pack` copy (the plain one is dropped unless
        `keeps_plain`). -> whether it was packed."""
        if self.packed is None and self.weight is not None:
            self.packed = onednn_pack(self.weight)
            if self.packed is not None:
                self.name = f"{self.name}-onednn"
                if not keeps_plain(self.weight):
                    self.weight = None
        return self.packed is not None

    def __call__(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        if use_packed(x, self.packed, self.weight):
            return packed_linear(x, self.packed, bias)  # (..., N)
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return linear(x, w, None if bias is None else bias.to(x.dtype))  # (..., N)


class Int8PackKernel:
    """Per-channel int8 through `aten._weight_int8pack_mm`: y = x @ (c * s)ᵀ, c = q - zero."""

    name = "int8pack"

    def __init__(self, c: Tensor, scale: Tensor, dtype: torch.dtype) -> None:
        self.codes = c.to(torch.int8).contiguous()  # (N, K)
        self.scale = scale.reshape(-1).to(dtype).contiguous()  # (N,)
        self.dtype = dtype
        self.nbytes = self.codes.numel() + self.scale.numel() * self.scale.element_size()
        self._op = torch.ops.aten._weight_int8pack_mm.default

    @classmethod
    def build(cls, qt: QuantizedTensor, dtype: torch.dtype) -> Int8PackKernel | None:
        """For 8-bit per-channel tensors whose codes minus zero points fit int8, else None."""
        if qt.scheme.kind != "int" or qt.scheme.bits != 8 or qt.n_groups != 1 or qt.zeros is None:
            return None
        c = qt.codes.to(torch.int16) - qt.zeros.to(torch.int16)  # (N, K) - (N, 1)
        if c.numel() and (int(c.min()) < -128 or int(c.max()) > 127):
            return None
        return cls(c, qt.scales[:, 0], dtype)

    def __call__(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, K)
        if x2.dtype != self.dtype:
            x2 = x2.to(self.dtype)
        y = self._op(x2.contiguous(), self.codes, self.scale)  # (M, N)
        if bias is not None:
            y = y + bias
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*shape[:-1], y.shape[-1])


class Int4PackKernel:
    """Group-affine weights through `aten._weight_int4pack_mm_for_cpu` (see the module docstring)."""

    name = "int4pack"

    def __init__(self, aff: Affine, dtype: torch.dtype) -> None:
        n, k = aff.codes.shape
        g = kernel_group(aff.group, k)
        assert g is not None and aff.bits <= 8, "check int4pack_ok first"
        rep = aff.group // g
        scale = aff.scale.repeat_interleave(rep, dim=1)  # (N, K / g)
        offset = aff.offset.repeat_interleave(rep, dim=1)
        # Codes are shifted so that their middle value meets the kernel's 8: the float offsets then
        # stay small next to the weights (a large offset would cancel after rounding to bfloat16).
        if aff.bits <= 4:  # c = 2^(bits-1): w = (q + 8 - c - 8) s + (off + c s)
            c = 1 << (aff.bits - 1)
            planes = [(aff.codes + (8 - c), scale, offset + c * scale)]
        else:  # q = 16 h + l, c = 2^(bits-5): w = (h + 8 - c - 8) 16 s + (l - 8) s + (off + 16 c s + 8 s)
            c = 1 << (aff.bits - 5)
            planes = [((aff.codes >> 4) + (8 - c), 16 * scale, offset + (16 * c + 8) * scale),
                      (aff.codes & 15, scale, torch.zeros_like(scale))]
        codes = torch.cat([p[0] for p in planes], 1).to(torch.int32)  # (N, P K)
        sz = torch.cat([torch.stack([p[1], p[2]], -1) for p in planes], 1)  # (N, P K / g, 2)
        pad = -n % INT4_ROWS
        if pad:  # zero rows: code 8, scale 0, offset 0
            codes = torch.cat([codes, codes.new_full((pad, codes.shape[1]), 8)])
            sz = torch.cat([sz, sz.new_zeros(pad, *sz.shape[1:])])
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)  # (N', P K / 2)
        self.sz = sz.transpose(0, 1).to(dtype).contiguous()  # (P K / g, N', 2)
        self.perm, self.group, self.n, self.planes, self.dtype = aff.perm, g, n, len(planes), dtype
        self._op = torch.ops.aten._weight_int4pack_mm_for_cpu.default  # the overload, looked up once
        self.nbytes = sum(t.numel() * t.element_size() for t in (self.packed, self.sz))
        self._plain = aff.perm is None and len(planes) == 1 and not pad  # x goes in and y comes out as they are

    def _mm(self, x2: Tensor) -> Tensor:
        """The op over (M, K) rows. ATen's kernel works in blocks of 4 rows and a last partial
        block costs a whole one, while 1-3 rows alone take a cheaper path: so M = 4q + r, r > 0,
        runs as 4q rows and r rows, two calls with the same per-row results (bench/int4_rows.py on
        the Xeon, 11264 x 2048: M = 5 in 2.17 ms instead of 2.66, M = 6 2.34 vs 2.67, M = 9 3.43
        vs 4.00; bit-identical, tests/kernels/test_dispatch.py)."""
        m = x2.shape[0]
        q = m & ~3
        if q == 0 or q == m:
            return self._op(x2, self.packed, self.group, self.sz)  # (M, N')
        return torch.cat((self._op(x2[:q], self.packed, self.group, self.sz),
                          self._op(x2[q:], self.packed, self.group, self.sz)))  # (M, N')

    def __call__(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        shape = x.shape
        if self._plain and bias is None and x.dtype == self.dtype and x.is_contiguous():  # the decode hot path
            return self._mm(x.view(-1, shape[-1])).view(*shape[:-1], self.n)
        x2 = x.reshape(-1, shape[-1])  # (M, K)
        if x2.dtype != self.dtype:
            x2 = x2.to(self.dtype)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if self.planes == 2:
            x2 = torch.cat([x2, x2], 1)  # (M, 2K) against [high plane | low plane]
        elif not x2.is_contiguous():
            x2 = x2.contiguous()
        y = self._mm(x2)  # (M, N')
        if y.shape[1] != self.n:
            y = y[:, : self.n]
        if bias is not None:
            y = y + bias
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*shape[:-1], self.n) if y.is_contiguous() else y.reshape(*shape[:-1], self.n)


def fuse_kernels(kernels: list[object]) -> object | None:
    """One kernel computing the outputs of `kernels` side by side (q/k/v, gate/up: the same input),
    or None where they do not share a layout. The packed CPU layouts are row-local, so fusing is a
    concatenation along N: int4pack kernels with the same group, planes, dtype, no act-order
    permutation and no padded rows, every part but the last a whole number of the layout's 64-row
    blocks; int8pack and dense kernels of one dtype. One call instead of
    two or three: less per-call overhead, and the kernel's threads split a longer N."""
    first = kernels[0]
    if not all(type(k) is type(first) for k in kernels) or len(kernels) < 2:
        return None
    if isinstance(first, Int4PackKernel):
        ks = [k for k in kernels if isinstance(k, Int4PackKernel)]
        same = all(k.group == first.group and k.planes == first.planes and k.dtype == first.dtype for k in ks)
        if not same or any(k.perm is not None or k.packed.shape[0] != k.n for k in ks):
            return None
        if any(k.n % INT4_PACK_BLOCK for k in ks[:-1]):  # a part must end on a packing block
            return None
        fused = object.__new__(Int4PackKernel)
        fused.packed = torch.cat([k.packed for k in ks])  # (sum N, P K / 2)
        fused.sz = torch.cat([k.sz for k in ks], 1).contiguous()  # (P K / g, sum N, 2)
        fused.perm, fused.group, fused.n, fused.planes, fused.dtype = None, first.group, sum(k.n for k in ks), \
            first.planes, first.dtype
        fused._op = first._op
        fused.nbytes = sum(k.nbytes for k in ks)
        fused._plain = first.planes == 1 and fused.packed.shape[0] == fused.n
        return fused
    if isinstance(first, Int8PackKernel):
        ks8 = [k for k in kernels if isinstance(k, Int8PackKernel)]
        if any(k.dtype != first.dtype for k in ks8):
            return None
        return Int8PackKernel(torch.cat([k.codes for k in ks8]), torch.cat([k.scale for k in ks8]), first.dtype)
    if isinstance(first, DenseKernel):
        kd = [k for k in kernels if isinstance(k, DenseKernel)]
        if any(k.weight is None for k in kd):  # packed: fuse before packing
            return None
        if any(k.weight.dtype != first.weight.dtype for k in kd):
            return None
        fused_d = object.__new__(DenseKernel)
        fused_d.name, fused_d.weight, fused_d.packed = first.name, torch.cat([k.weight for k in kd]), None
        fused_d.nbytes = sum(k.nbytes for k in kd)
        return fused_d
    return None


def kernel_group(group: int, k: int) -> int | None:
    """The largest group size the int4 kernel accepts that divides the scheme's group (and K)."""
    return next((g for g in INT4_GROUPS if group % g == 0 and k % g == 0), None)


# ------------------------------------------------------------------ CUDA

class TritonKernel:
    """`kernels.dequant_gemm` (Triton), repacked by its `pack`."""

    name = "triton"

    def __init__(self, qt: QuantizedTensor, device: torch.device) -> None:
        from infq.kernels import dequant_gemm

        self._op = dequant_gemm.dequant_gemm
        self.packed = dequant_gemm.pack(qt).to(device)
        self.nbytes = int(getattr(self.packed, "nbytes", 0))

    def __call__(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        return self._op(x, self.packed, None if bias is None else bias.to(x.dtype))


def _triton_supported(qt: QuantizedTensor) -> bool:
    try:
        from infq.kernels import dequant_gemm
    except ImportError:  # no triton in this environment
        return False
    return bool(dequant_gemm.supported(qt))


# ------------------------------------------------------------------ choice

def _choose(qt: QuantizedTensor, device: torch.device, dtype: torch.dtype) -> tuple[str, object]:
    """(kernel name, what its constructor needs), each check and conversion done once."""
    if device.type == "cuda":
        return ("triton", None) if _triton_supported(qt) else ("dense", None)
    if device.type != "cpu" or dtype != torch.bfloat16 or qt.scheme.kind == "fp8":
        return "dense", None
    k8 = Int8PackKernel.build(qt, dtype)
    if k8 is not None:
        return "int8pack", k8
    aff = affine_from(qt)
    if aff is not None and aff.bits <= 8 and kernel_group(aff.group, aff.codes.shape[1]) is not None:
        return "int4pack", aff
    return "dense", None


def select(qt: QuantizedTensor, device: torch.device | str, dtype: torch.dtype) -> str:
    """Name of the kernel `prepare` builds for this tensor, device and compute dtype."""
    return _choose(qt, torch.device(device), dtype)[0]


def prepare(qt: QuantizedTensor, device: torch.device | str, dtype: torch.dtype) -> Kernel:
    """Repack `qt` once for the kernel `select` names; the result runs `kernel(x, bias)`."""
    device = torch.device(device)
    name, made = _choose(qt, device, dtype)
    if name == "triton":
        return TritonKernel(qt, device)
    if isinstance(made, Int8PackKernel):
        return made
    if isinstance(made, Affine):
        return Int4PackKernel(made, dtype)
    return DenseKernel(qt, device, dtype)


# ------------------------------------------------------------------ FP8 on GPUs: torch._scaled_mm

def scaled_mm_supported(device: torch.device) -> bool:
    """FP8 tensor cores: CUDA with compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm_shapes_ok(codes: Tensor, dtype: torch.dtype, per_tensor: bool) -> bool:
    """cuBLASLt FP8 needs K and N multiples of 16; row-wise scales need a bfloat16 output."""
    n, k = codes.shape
    return n % 16 == 0 and k % 16 == 0 and (per_tensor or dtype == torch.bfloat16)


def fp8_linear_scaled_mm(x: Tensor, codes: Tensor, w_scale: Tensor, bias: Tensor | None, act: str,
                         input_scale: Tensor | None = None, w_per_tensor: bool = False) -> Tensor:
    """FP8 linear with `torch._scaled_mm` (act static or dynamic); callers check scaled_mm_shapes_ok.
    Oracle: `ref.fp8_linear_ref`."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # (M, K)
    m, n = x2.shape[0], codes.shape[0]
    x8, sx = quantize_act(x2, act, input_scale)  # (M, K), () or (M, 1)
    sw = w_scale.to(x.device, torch.float32)  # (N, 1)
    if act == "static" and w_per_tensor:  # tensor-wise: two scalars
        sa, sb = sx.reshape(()), sw[0, 0].reshape(())
    else:  # row-wise: (M, 1) and (1, N)
        sa, sb = sx.reshape(-1, 1).expand(m, 1).contiguous(), sw.reshape(1, n).contiguous()
    y = torch._scaled_mm(x8, codes.t(), scale_a=sa, scale_b=sb, out_dtype=x.dtype)  # (M, N); codes.t() column-major
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*shape[:-1], n)

