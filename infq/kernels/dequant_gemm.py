"""Triton dequant-GEMM: `y = x @ dequant(W)^T (+ bias)` straight from packed low-bit weights.

One kernel family covers every scheme. At load time `pack(qt)` turns a `QuantizedTensor` into a
`TritonPacked` (see `dequant_pack.py`): codes split into at most two bit planes of 1/2/4/8 bits
(3 = 2+1, 5 = 4+1, 6 = 4+2), each packed 32/bits codes per int32 along K, rows (N) outermost so a
tile row is one contiguous run; per-group scales (and zero points or mins) as `(N, G)` tensors,
optionally times a super-block scale `(N, G/sup)` for GGUF K-quants. Every tile decodes
`w = (q - z) * s` (or `q * s - m` for K-quant mins, or e4m3 `q * s` for FP8) in fp32, exactly as
the reference decoders do.

Two kernels:
  * `_gemv_kernel` (M = 1, decode): each program owns BLOCK_N output rows and streams their whole
    K, word by word: a code costs one mask, one FADD and one FMA in fp32 (`_u2f`'s exponent trick,
    no int->float converts), products are summed per word before its group scale is applied, and
    rows are reduced once after the loop. No tensor cores, no split-K: N / BLOCK_N programs.
  * `_gemm_kernel` (M >= 2): tiles dequantized to the activation dtype and fed to `tl.dot` with an
    fp32 accumulator; optional split-K (fp32 atomics into a workspace) for small M where N / BLOCK_N
    programs are too few to use the bandwidth. Its tile decoder is `_dequant_tile` (whole words and
    per-group scales through reshapes) or `_dequant_flat` (a word and a scale gathered per
    element): the autotuner's choice, config key FLAT.
Both are autotuned (key: M bucket, N, K and the scheme) on a GPU; on a CPU tensor (the tests, under
TRITON_INTERPRET=1) one fixed config runs, or the one a test passes. Act-order (`g_idx` not
sorted) permutes W's columns at pack time so groups are contiguous and reads x's columns through the
same permutation inside the kernel. Limits: group sizes must be multiples of 16 (or one group per
row); 7-bit codes are not packed; the FP8 path is weight-only (activations stay fp16/bf16); bf16
activations multiply bf16-rounded weights on the tensor-core path, as PyTorch would in bf16.
Speed (bench/results/gpu_dequant_gemm.json, H200): the GEMV is 1.2-1.5x PyTorch's fp16 matmul for
int4 g128, bound by instructions per code rather than memory; the tile kernel is slower than cuBLAS
fp16 for M >= 4 (0.5-0.65x at M = 4-16, 0.17-0.41x at M = 64-256). Autotuning runs on the first call
of each shape; capture CUDA graphs only after it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from infq.kernels.dequant_pack import TritonPacked, pack, supported  # noqa: F401  (public API)
from infq.quantizers.scheme import QuantizedTensor  # noqa: F401  (public API type)

__all__ = ["TritonPacked", "pack", "supported", "dequant_gemm", "GEMV_MAX_M"]

GEMV_MAX_M = 1  # rows handled by the GEMV kernel; more rows go to the tensor-core kernel


# ---------------------------------------------------------------- device code


@triton.jit
def _unpack_plane(ptr, ld, offs_n, n_mask, k0, KW, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """Codes of one bit plane for rows offs_n, columns k0..k0+BLOCK_K -> int32 (BLOCK_N, BLOCK_K)."""
    PW: tl.constexpr = 32 // BITS  # codes per int32 word
    BW: tl.constexpr = BLOCK_K // PW
    offs_w = k0 // PW + tl.arange(0, BW)
    words = tl.load(ptr + offs_n[:, None] * ld + offs_w[None, :],
                    mask=n_mask[:, None] & (offs_w[None, :] < KW), other=0)  # (BN, BW)
    shifts = tl.arange(0, PW) * BITS
    q = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # (BN, BW, PW)
    return tl.reshape(q, (BLOCK_N, BLOCK_K))


@triton.jit
def _e4m3_to_f32(b):
    """float8 e4m3fn bytes (int32 0..255) -> float32, by bit arithmetic (no fp8 hardware needed)."""
    e = (b >> 3) & 15
    m = b & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)  # 2^(e-7) * (1 + m/8)
    v = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)  # subnormal: m * 2^-9
    return tl.where((b >> 7) != 0, -v, v)


@triton.jit
def _u2f(q):
    """Small non-negative ints (< 2^23) -> float32 exactly: OR in the exponent of 2^23, subtract
    2^23 (a LOP3 and an FADD instead of a quarter-rate int->float conversion)."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _dequant_tile(lo_ptr, hi_ptr, s_ptr, s2_ptr, z_ptr, m2_ptr, offs_n, n_mask, k0,
                  KW_LO, KW_HI, G, gs, lo_ld, hi_ld, s_ld, s2_ld, z_ld, m2_ld,
                  BITS_LO: tl.constexpr, BITS_HI: tl.constexpr, FP8: tl.constexpr,
                  OFFSET_MODE: tl.constexpr, ZERO_CONST: tl.constexpr, SUP: tl.constexpr,
                  GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One weight tile as (q (BN, NG, GROUP) f32, s (BN, NG) f32, z (BN, NG) f32).

    OFFSET_MODE 0/1: w = (q - z) * s with z = ZERO_CONST or per-group zeros; 2: w = q * s - z
    (z = K-quant min); FP8: q is the e4m3 value. s (and K-quant mins) times the super-block factor
    when SUP > 1. NG = BLOCK_K // GROUP groups of the tile, group index (k0 + j*GROUP) // gs."""
    NG: tl.constexpr = BLOCK_K // GROUP
    q = _unpack_plane(lo_ptr, lo_ld, offs_n, n_mask, k0, KW_LO, BITS_LO, BLOCK_N, BLOCK_K)
    if BITS_HI > 0:
        q = q | (_unpack_plane(hi_ptr, hi_ld, offs_n, n_mask, k0, KW_HI, BITS_HI, BLOCK_N, BLOCK_K) << BITS_LO)
    if FP8:
        qf = _e4m3_to_f32(q)
    else:
        qf = _u2f(q)
    q3 = tl.reshape(qf, (BLOCK_N, NG, GROUP))  # (BN, NG, GROUP)
    g = (k0 + tl.arange(0, NG) * GROUP) // gs  # (NG,) group of each sub-tile
    gmask = n_mask[:, None] & (g[None, :] < G)
    s = tl.load(s_ptr + offs_n[:, None] * s_ld + g[None, :], mask=gmask, other=0).to(tl.float32)  # (BN, NG)
    if SUP > 1:
        s2p = s2_ptr + offs_n[:, None] * s2_ld + g[None, :] // SUP
        s = s * tl.load(s2p, mask=gmask, other=0).to(tl.float32)
    if OFFSET_MODE == 0:
        z = tl.zeros((BLOCK_N, NG), tl.float32) + ZERO_CONST
    else:
        z = tl.load(z_ptr + offs_n[:, None] * z_ld + g[None, :], mask=gmask, other=0).to(tl.float32)
        if OFFSET_MODE == 2:
            if SUP > 1:
                m2p = m2_ptr + offs_n[:, None] * m2_ld + g[None, :] // SUP
                z = z * tl.load(m2p, mask=gmask, other=0).to(tl.float32)
    return q3, s, z


@triton.jit
def _dequant_flat(lo_ptr, hi_ptr, s_ptr, s2_ptr, z_ptr, m2_ptr, offs_n, n_mask, offs_k,
                  KW_LO, KW_HI, G, gs, lo_ld, hi_ld, s_ld, s2_ld, z_ld, m2_ld,
                  BITS_LO: tl.constexpr, BITS_HI: tl.constexpr, FP8: tl.constexpr,
                  OFFSET_MODE: tl.constexpr, ZERO_CONST: tl.constexpr, SUP: tl.constexpr):
    """The same tile as `_dequant_tile`, decoded element-wise with no reshapes -> w (BN, BK) f32.

    Every element loads its own word and group scale (neighbours share addresses, served by L1);
    an alternative the autotuner weighs against the reshaping decoder (layout conversions)."""
    PW_LO: tl.constexpr = 32 // BITS_LO
    offs_w = offs_k // PW_LO
    words = tl.load(lo_ptr + offs_n[:, None] * lo_ld + offs_w[None, :],
                    mask=n_mask[:, None] & (offs_w[None, :] < KW_LO), other=0)  # (BN, BK)
    q = (words >> ((offs_k % PW_LO) * BITS_LO)[None, :]) & ((1 << BITS_LO) - 1)
    if BITS_HI > 0:
        PW_HI: tl.constexpr = 32 // BITS_HI
        offs_wh = offs_k // PW_HI
        hw = tl.load(hi_ptr + offs_n[:, None] * hi_ld + offs_wh[None, :],
                     mask=n_mask[:, None] & (offs_wh[None, :] < KW_HI), other=0)
        q = q | (((hw >> ((offs_k % PW_HI) * BITS_HI)[None, :]) & ((1 << BITS_HI) - 1)) << BITS_LO)
    if FP8:
        qf = _e4m3_to_f32(q)
    else:
        qf = _u2f(q)
    g = offs_k // gs  # (BK,)
    gmask = n_mask[:, None] & (g[None, :] < G)
    s = tl.load(s_ptr + offs_n[:, None] * s_ld + g[None, :], mask=gmask, other=0).to(tl.float32)  # (BN, BK)
    if SUP > 1:
        s = s * tl.load(s2_ptr + offs_n[:, None] * s2_ld + g[None, :] // SUP, mask=gmask, other=0).to(tl.float32)
    if OFFSET_MODE == 0:
        w = (qf - ZERO_CONST) * s
    elif OFFSET_MODE == 1:
        w = (qf - tl.load(z_ptr + offs_n[:, None] * z_ld + g[None, :], mask=gmask, other=0).to(tl.float32)) * s
    else:
        z = tl.load(z_ptr + offs_n[:, None] * z_ld + g[None, :], mask=gmask, other=0).to(tl.float32)
        if SUP > 1:
            z = z * tl.load(m2_ptr + offs_n[:, None] * m2_ld + g[None, :] // SUP, mask=gmask, other=0).to(tl.float32)
        w = qf * s - z
    return w


@triton.jit
def _gemv_jit(x_ptr, out_ptr, bias_ptr, lo_ptr, hi_ptr, s_ptr, s2_ptr, z_ptr, m2_ptr, perm_ptr,
                 N, K, KW_LO, KW_HI, G, gs, stride_xm, stride_om,
                 lo_ld, hi_ld, s_ld, s2_ld, z_ld, m2_ld, M_BUCKET,
                 BITS_LO: tl.constexpr, BITS_HI: tl.constexpr, FP8: tl.constexpr,
                 OFFSET_MODE: tl.constexpr, ZERO_CONST: tl.constexpr, SUP: tl.constexpr,
                 GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_ORDER: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GS: tl.constexpr, EVEN_K: tl.constexpr):
    """out[m, n] = sum_k x[m, k] w[n, k]; grid (cdiv(N, BLOCK_N), M). GS: the group size as a
    compile-time constant (0: one group per row), so group indices are shifts, not divisions;
    EVEN_K: K is a multiple of BLOCK_K, no masks along K.

    A tile is held as (BN, PW, BW): word w of the low plane and its field i (channel
    k0 + w*PW + i). Words are the fastest dim (coalesced loads); the PW fields of a word stay in
    one thread, so the per-word sum over fields needs no shuffles, and each word's PW codes share
    one group (gs % PW == 0): one scale load and two FMAs per word, not per code. Partial sums stay
    per (row, word) across the K loop; rows are reduced once at the end."""
    PW: tl.constexpr = 32 // BITS_LO
    BW: tl.constexpr = BLOCK_K // PW
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    n_mask = offs_n < N
    offs_w = tl.arange(0, BW)  # (BW,) word of the tile
    acc = tl.zeros((BLOCK_N, BW), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w_idx = k0 // PW + offs_w  # (BW,)
        words = tl.load(lo_ptr + offs_n[:, None] * lo_ld + w_idx[None, :],
                        mask=n_mask[:, None] & (w_idx[None, :] < KW_LO), other=0)  # (BN, BW)
        words = words.to(tl.uint32, bitcast=True)  # logical shifts: a field is one shift + one LOP3
        if BITS_HI > 0:
            R: tl.constexpr = (32 // BITS_HI) // PW  # low-plane words per high-plane word
            h_idx = k0 // (32 // BITS_HI) + offs_w // R  # (BW,)
            hw = tl.load(hi_ptr + offs_n[:, None] * hi_ld + h_idx[None, :],
                         mask=n_mask[:, None] & (h_idx[None, :] < KW_HI), other=0)  # (BN, BW)
            hw = hw.to(tl.uint32, bitcast=True) >> ((offs_w % R) * (PW * BITS_HI)).to(tl.uint32)[None, :]
        p = tl.zeros((BLOCK_N, BW), tl.float32)
        xs = tl.zeros((BW,), tl.float32)
        FIT: tl.constexpr = 23 // BITS_LO  # fields that fit a float32 mantissa where they lie
        upper = words >> (FIT * BITS_LO)  # the remaining fields, moved down once per word
        for i in tl.static_range(PW):
            kk = k0 + offs_w * PW + i  # (BW,) channel of field i of every word
            if EVEN_K:
                if ACT_ORDER:
                    cols = tl.load(perm_ptr + kk)
                else:
                    cols = kk
                xi = tl.load(x_ptr + m * stride_xm + cols).to(tl.float32)  # (BW,)
            else:
                if ACT_ORDER:
                    cols = tl.load(perm_ptr + kk, mask=kk < K, other=0)
                else:
                    cols = kk
                xi = tl.load(x_ptr + m * stride_xm + cols, mask=kk < K, other=0).to(tl.float32)
            xs += xi
            if BITS_HI > 0 or FP8:  # generic: shift the field down, combine planes, decode
                q = (words >> (i * BITS_LO)) & ((1 << BITS_LO) - 1)  # (BN, BW)
                if BITS_HI > 0:
                    q = q | (((hw >> (i * BITS_HI)) & ((1 << BITS_HI) - 1)) << BITS_LO)
                if FP8:
                    qf = _e4m3_to_f32(q.to(tl.int32, bitcast=True))
                else:
                    qf = _u2f(q)
                p += qf * xi[None, :]
            else:
                # One plane: mask field i in place and OR in the exponent of 2^23 -> the float
                # 2^23 + q * 2^j exactly (j = its bit offset, q * 2^j < 2^23); minus 2^23 gives
                # q * 2^j, and x is scaled by 2^-j (exact) instead: one LOP3 + FADD + FFMA a code.
                if i < FIT:
                    q = words & (((1 << BITS_LO) - 1) << (i * BITS_LO))
                    xj = xi * (1.0 / (1 << (i * BITS_LO)))
                else:
                    q = upper & (((1 << BITS_LO) - 1) << ((i - FIT) * BITS_LO))
                    xj = xi * (1.0 / (1 << ((i - FIT) * BITS_LO)))
                qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                p += qf * xj[None, :]
        if GS == 0:
            g = tl.zeros((BW,), tl.int32)
        else:
            g = (k0 + offs_w * PW) // GS  # (BW,) group of each word
        gmask = n_mask[:, None] & (g[None, :] < G)
        s = tl.load(s_ptr + offs_n[:, None] * s_ld + g[None, :], mask=gmask, other=0).to(tl.float32)  # (BN, BW)
        if SUP > 1:
            s = s * tl.load(s2_ptr + offs_n[:, None] * s2_ld + g[None, :] // SUP, mask=gmask, other=0).to(tl.float32)
        if OFFSET_MODE == 0:
            acc += s * (p - ZERO_CONST * xs[None, :])
        else:
            z = tl.load(z_ptr + offs_n[:, None] * z_ld + g[None, :], mask=gmask, other=0).to(tl.float32)
            if OFFSET_MODE == 1:
                acc += s * (p - z * xs[None, :])
            else:
                if SUP > 1:
                    z = z * tl.load(m2_ptr + offs_n[:, None] * m2_ld + g[None, :] // SUP, mask=gmask,
                                    other=0).to(tl.float32)
                acc += s * p - z * xs[None, :]
    out = tl.sum(acc, axis=1)  # (BN,)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_mask)


_gemv_kernel = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_gemv_jit)


@triton.jit
def _gemm_kernel(x_ptr, out_ptr, bias_ptr, lo_ptr, hi_ptr, s_ptr, s2_ptr, z_ptr, m2_ptr, perm_ptr,
                 M, N, K, KW_LO, KW_HI, G, gs, stride_xm, stride_om,
                 lo_ld, hi_ld, s_ld, s2_ld, z_ld, m2_ld, M_BUCKET,
                 BITS_LO: tl.constexpr, BITS_HI: tl.constexpr, FP8: tl.constexpr,
                 OFFSET_MODE: tl.constexpr, ZERO_CONST: tl.constexpr, SUP: tl.constexpr,
                 GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_ORDER: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, FLAT: tl.constexpr = False, EMULATE_BF16: tl.constexpr = False):
    """out (M, N) = x (M, K) @ w^T; grid (cdiv(M, BM) * cdiv(N, BN), SPLIT_K). With SPLIT_K > 1
    `out_ptr` is a zeroed fp32 workspace that every split adds into (bias added by the caller).
    EMULATE_BF16: the interpreter's bf16 tl.dot is wrong (Triton 3.9), so there the bf16 operands
    are widened to fp32 and multiplied exactly (bf16 products are exact in fp32): same result."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m  # M fastest: programs sharing a weight tile run together (L2 reuse)
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kt in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        k0 = kt * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        if ACT_ORDER:
            cols = tl.load(perm_ptr + offs_k, mask=k_mask, other=0)
        else:
            cols = offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0)  # (BM, BK)
        if FLAT:
            w = _dequant_flat(lo_ptr, hi_ptr, s_ptr, s2_ptr, z_ptr, m2_ptr, offs_n, n_mask, offs_k,
                              KW_LO, KW_HI, G, gs, lo_ld, hi_ld, s_ld, s2_ld, z_ld, m2_ld,
                              BITS_LO, BITS_HI, FP8, OFFSET_MODE, ZERO_CONST, SUP)
        else:
            q3, s, z = _dequant_tile(lo_ptr, hi_ptr, s_ptr, s2_ptr, z_ptr, m2_ptr, offs_n, n_mask, k0,
                                     KW_LO, KW_HI, G, gs, lo_ld, hi_ld, s_ld, s2_ld, z_ld, m2_ld,
                                     BITS_LO, BITS_HI, FP8, OFFSET_MODE, ZERO_CONST, SUP, GROUP, BLOCK_N, BLOCK_K)
            if OFFSET_MODE == 2:
                w3 = q3 * s[:, :, None] - z[:, :, None]
            else:
                w3 = (q3 - z[:, :, None]) * s[:, :, None]
            w = tl.reshape(w3, (BLOCK_N, BLOCK_K))
        w = w.to(x_ptr.dtype.element_ty)  # (BN, BK)
        if EMULATE_BF16:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)  # (BM, BN) fp32
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask)


# ---------------------------------------------------------------- autotuning (GPU only)

def _bench(fn, quantiles=None):
    """The autotuner's timer: a CUDA graph of repeated launches, so configs are ranked by GPU time,
    not by Python launch overhead (which swamps a few-microsecond GEMV in eager timing)."""
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=20, quantiles=quantiles)
    except RuntimeError:  # graph capture unavailable: eager timing
        return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def _prune(configs, named_args, **kwargs):
    """Drop reshaping-decoder configs whose BLOCK_K is not a multiple of the scheme's tile group."""
    group = named_args.get("GROUP", kwargs.get("GROUP", 16))
    kept = [c for c in configs if c.kwargs.get("FLAT", False) or c.kwargs["BLOCK_K"] % group == 0]
    return kept or [c for c in configs if c.kwargs.get("FLAT", True)][:1]


_SCHEME_KEY = ["N", "K", "G", "BITS_LO", "BITS_HI", "FP8", "OFFSET_MODE", "SUP", "ACT_ORDER"]
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bn, bk, w, st in ((4, 512, 4, 2), (8, 512, 4, 2), (16, 256, 4, 2), (8, 1024, 4, 1), (16, 512, 8, 2),
                          (4, 1024, 4, 2), (16, 1024, 8, 1), (32, 512, 8, 2), (2, 1024, 2, 2),
                          # more words in flight per thread (the H200 runs picked the longest tile on offer)
                          (8, 2048, 4, 1), (4, 2048, 4, 1), (8, 2048, 8, 1), (4, 4096, 8, 1))
]
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "FLAT": flat},
                  num_warps=w, num_stages=st)
    for bm, bn, bk, sk, w, st, flat in (
        (16, 32, 128, 1, 4, 3, False), (16, 64, 128, 1, 4, 3, False), (16, 64, 128, 4, 4, 3, False),
        (16, 32, 128, 1, 4, 3, True), (16, 64, 128, 4, 4, 3, True),
        (64, 64, 128, 1, 4, 3, False), (64, 128, 128, 1, 8, 3, False), (128, 128, 128, 1, 8, 3, False),
        (128, 128, 64, 1, 8, 3, True), (128, 256, 64, 1, 8, 3, True),
    )
]


def _gemm_pruner(configs, named_args, **kwargs):
    """Also keep only tiles that suit M: min(M, 128)/4 <= BLOCK_M <= max(16, M bucket), split-K for
    small M only."""
    mb = named_args.get("M_BUCKET", kwargs.get("M_BUCKET", 16))
    kept = [c for c in _prune(configs, named_args, **kwargs)
            if min(mb, 128) // 4 <= c.kwargs["BLOCK_M"] <= max(16, mb) and (c.kwargs["SPLIT_K"] == 1 or mb <= 32)]
    return kept or configs[:1]


_gemv_tuned = triton.autotune(_GEMV_CONFIGS, key=["M_BUCKET", *_SCHEME_KEY], do_bench=_bench)(_gemv_kernel)
_gemm_tuned = triton.autotune(_GEMM_CONFIGS, key=["M_BUCKET", *_SCHEME_KEY], do_bench=_bench,
                              prune_configs_by={"early_config_prune": _gemm_pruner},
                              restore_value=["out_ptr"])(_gemm_kernel)

# fixed configs where nothing is tuned (CPU tensors: the interpreter)
_GEMV_DEFAULT = {"BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 4}
_GEMM_DEFAULT = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 1, "FLAT": False, "num_warps": 4}


# ---------------------------------------------------------------- launchers


def _interpreting() -> bool:
    """True if this module's kernels were built for Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_gemv_jit).__name__ == "InterpretedFunction"


def _m_bucket(m: int) -> int:
    """Autotuning key for M: next power of two, capped (prefill lengths vary per call)."""
    return min(1 << max(0, (m - 1).bit_length()), 4096)


def _check(x: Tensor, packed: TritonPacked, bias: Tensor | None) -> None:
    n, k = packed.shape
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dequant_gemm takes fp16/bf16 activations, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {k}")
    if x.device != packed.lo.device:
        raise ValueError(f"x is on {x.device}, the packed weight on {packed.lo.device}; call packed.to(device)")
    for name, t in packed.tensors().items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"packed.{name} must be contiguous")
    if bias is not None and (bias.shape != (n,) or bias.device != x.device):
        raise ValueError(f"bias must be ({n},) on {x.device}, got {tuple(bias.shape)} on {bias.device}")


def _kernel_args(x2: Tensor, out: Tensor, bias: Tensor | None, p: TritonPacked) -> tuple[list, list, dict]:
    """Positional tensor/int arguments and scheme constexprs shared by both kernels."""
    n, k = p.shape
    dummy = p.lo  # never read: the constexpr flags switch the loads off
    t = [x2, out, bias if bias is not None else dummy, p.lo, p.hi if p.hi is not None else dummy, p.scales,
         p.scales2 if p.scales2 is not None else dummy, p.zeros if p.zeros is not None else dummy,
         p.mins2 if p.mins2 is not None else dummy, p.perm if p.perm is not None else dummy]
    ld = [(u.shape[1] if u is not None else 0) for u in (p.lo, p.hi, p.scales, p.scales2, p.zeros, p.mins2)]
    groups = p.scales.shape[1]
    gs = p.group_size if groups > 1 else 1 << 30  # one group: every tile's group index is 0
    ints = [p.lo.shape[1], p.hi.shape[1] if p.hi is not None else 0, groups, gs, x2.stride(0), out.stride(0), *ld]
    meta = {"BITS_LO": p.bits_lo, "BITS_HI": p.bits_hi, "FP8": p.fp8, "OFFSET_MODE": p.offset_mode,
            "ZERO_CONST": p.zero_const, "SUP": p.sup, "GROUP": p.tile_group, "HAS_BIAS": bias is not None,
            "ACT_ORDER": p.perm is not None}
    return t, ints, meta


def gemv(x2: Tensor, p: TritonPacked, bias: Tensor | None = None, config: dict | None = None) -> Tensor:
    """Launcher of `_gemv_kernel`: x2 (M, K) contiguous rows -> (M, N) in x2's dtype."""
    m, n = x2.shape[0], p.shape[0]
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    t, ints, meta = _kernel_args(x2, out, bias, p)
    args = [*t, n, p.shape[1], *ints, _m_bucket(m)]
    meta["GS"] = p.group_size if p.scales.shape[1] > 1 else 0
    if config is None and x2.is_cuda:
        def grid(c):
            return (triton.cdiv(n, c["BLOCK_N"]), m)
        _gemv_tuned[grid](*args, **meta)
    else:
        c = dict(config or _GEMV_DEFAULT)
        _gemv_kernel[(triton.cdiv(n, c["BLOCK_N"]), m)](*args, **meta, **c)
    return out


def gemm(x2: Tensor, p: TritonPacked, bias: Tensor | None = None, config: dict | None = None) -> Tensor:
    """Launcher of `_gemm_kernel`: x2 (M, K) contiguous rows -> (M, N) in x2's dtype."""
    m, n = x2.shape[0], p.shape[0]
    cfg = None if config is None and x2.is_cuda else dict(config or _GEMM_DEFAULT)
    # split-K accumulates into fp32; a tuned run may pick it, so tuned runs always get the workspace
    split = cfg is None or cfg["SPLIT_K"] > 1
    out = torch.zeros((m, n), dtype=torch.float32, device=x2.device) if split else \
        torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    t, ints, meta = _kernel_args(x2, out, None if split else bias, p)
    args = [*t, m, n, p.shape[1], *ints, _m_bucket(m)]
    if cfg is None:
        def grid(c):
            return (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"])
        _gemm_tuned[grid](*args, **meta)
    else:
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
        _gemm_kernel[grid](*args, **meta, **cfg, EMULATE_BF16=not x2.is_cuda and x2.dtype == torch.bfloat16)
    if split:
        out = out.to(x2.dtype) if bias is None else (out + bias.float()).to(x2.dtype)
    return out


def dequant_gemm(x: Tensor, packed: TritonPacked, bias: Tensor | None = None) -> Tensor:
    """Public op: x (..., K) fp16/bf16 -> (..., N) = x @ dequant(W)^T (+ bias), in x's dtype."""
    _check(x, packed, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] == 0:
        return x.new_empty(*lead, packed.shape[0])
    run = gemv if x2.shape[0] <= GEMV_MAX_M else gemm
    return run(x2, packed, bias).reshape(*lead, packed.shape[0])
