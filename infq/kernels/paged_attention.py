"""Paged decode attention and the paged-KV write (Triton), twins of `ref.paged_attention_ref` and
`ref.write_kv_ref`.

Decode: one query token per sequence, q (B, H, D), over the paged cache of one layer, k_cache/v_cache
(num_blocks, block_size, Hkv, D), block_tables (B, max_blocks) int32 (entries past a sequence's
length are ignored, -1 by convention), seq_lens (B,) int32. A program owns one kv head of one
sequence and its whole query group (GQA: query heads kvh*G .. kvh*G+G-1, padded to 16 rows for the
tensor cores), so each K/V byte is read once per group. Tokens are gathered BLOCK_N at a time
through the block table, so tables with holes cost nothing extra. int8 / fp8-e4m3 caches carry one
float32 scale per (block, slot, kv head); the kernel folds it in after the dot products
(s = (q . k_code) * k_scale, out = (p * v_scale) @ v_code), so codes go to the tensor cores as-is.
Long contexts at small batch are split over the sequence (flash-decoding): each split writes its
running max, sum and unnormalized output, and a second kernel merges them. A sequence of length 0
gets zeros (as the reference does). Limits: head dim a power of two (64 and 128 tested), block_size
a power of two, q fp16/bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from infq.kernels.ref import KV_QMAX

_LOG2E = 1.4426950408889634


@triton.jit
def _kernel(Q, KC, VC, KS, VS, BT, SL, Out, PM, PL, PA, qk_scale,
            stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            stride_sb, stride_ss, stride_bt, stride_ob, stride_oh, tokens_per_split, ctx_bucket,
            GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
            QUANT: tl.constexpr, SPLIT: tl.constexpr, F32_DOT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (B, Hkv, splits). With SPLIT the partial (max, sum, acc) go to PM/PL (B, H, S), PA (B, H, S, D)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    seq_len = tl.load(SL + b)
    start = sp * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    offs_g = tl.arange(0, GROUP_P)  # (G,) query rows of this kv head's group
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    gmask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=gmask[:, None], other=0.0)
    if F32_DOT:  # the interpreter's bf16 dot multiplies raw bits; the same products in fp32
        q = q.to(tl.float32)
    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, HEAD_DIM], tl.float32)
    table = BT + b * stride_bt
    for n0 in tl.range(start, end, BLOCK_N):
        kn = n0 + offs_n  # (N,) token positions
        valid = kn < end
        blk = tl.load(table + kn // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slot = kn % BLOCK_SIZE
        k = tl.load(KC + blk[:, None] * stride_kb + slot[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :],
                    mask=valid[:, None], other=0.0)  # (N, D)
        v = tl.load(VC + blk[:, None] * stride_vb + slot[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :],
                    mask=valid[:, None], other=0.0)  # (N, D)
        s = tl.dot(q, tl.trans(k.to(q.dtype)))  # (G, N)
        if QUANT:
            ks = tl.load(KS + blk * stride_sb + slot * stride_ss + kvh, mask=valid, other=0.0)  # (N,)
            s = s * (ks * qk_scale)[None, :]
        else:
            s = s * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded rows see no key
        p = tl.math.exp2(s - m_safe[:, None])  # (G, N)
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if QUANT:
            vs = tl.load(VS + blk * stride_sb + slot * stride_ss + kvh, mask=valid, other=0.0)  # (N,)
            p = p * vs[None, :]
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None])  # (G, D)
        m_i = m_new
    if SPLIT:
        S = tl.num_programs(2)
        row = (b * tl.num_programs(1) * GROUP + heads) * S + sp  # index into (B, H, S)
        tl.store(PM + row, m_i, mask=gmask)
        tl.store(PL + row, l_i, mask=gmask)
        tl.store(PA + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=gmask[:, None])
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=gmask[:, None])


@triton.jit
def _merge_kernel(PM, PL, PA, Out, stride_ob, stride_oh, n_heads, n_splits,
                  HEAD_DIM: tl.constexpr, SPLITS_P: tl.constexpr):
    """Grid (B, H): merge the splits' (max, sum, acc) of one head into the normalized output."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P)
    offs_d = tl.arange(0, HEAD_DIM)
    smask = offs_s < n_splits
    row = (b * n_heads + h) * n_splits + offs_s  # (S,)
    m = tl.load(PM + row, mask=smask, other=float("-inf"))
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_max)  # (S,) empty splits weigh 0
    l_tot = tl.sum(tl.load(PL + row, mask=smask, other=0.0) * w, 0)
    a = tl.load(PA + row[:, None] * HEAD_DIM + offs_d[None, :], mask=smask[:, None], other=0.0)  # (S, D)
    out = tl.sum(a * w[:, None], 0) / tl.where(l_tot > 0, l_tot, 1.0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty))


def _configs() -> list[triton.Config]:
    """Decode is bandwidth-bound: a few key-tile widths and pipeline depths for H100/H200 (none of
    them spills registers in the sm_90 build with 16-aligned strides)."""
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn, w, s in [(32, 4, 3), (64, 4, 3), (64, 8, 2), (128, 4, 2), (128, 8, 3)]]


_tuned = triton.autotune(configs=_configs(), key=["ctx_bucket", "GROUP_P", "HEAD_DIM", "BLOCK_SIZE", "QUANT",
                                                   "SPLIT"])(_kernel)
_SPLIT_ALIGN = 128  # splits are whole multiples of every autotuned BLOCK_N


def _interpreting() -> bool:
    """Whether this module's kernels were built for the interpreter (TRITON_INTERPRET=1 at import, the
    CPU tests): then small tiles are used and bf16 dots run in fp32."""
    return not isinstance(_kernel, triton.runtime.JITFunction)


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
           k_scale: Tensor | None, v_scale: Tensor | None) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"need q (B, H, D) and k/v caches (num_blocks, block_size, Hkv, D), got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    nb, bs, hkv, d = k_cache.shape
    if q.shape[2] != d or d & (d - 1) or d < 16:
        raise ValueError(f"head dim must match the cache and be a power of two >= 16, got {q.shape[2]} vs {d}")
    if bs & (bs - 1):
        raise ValueError(f"block_size must be a power of two, got {bs}")
    if q.shape[1] % hkv:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of kv heads {hkv}")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"q must be fp16 or bf16, got {q.dtype}")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("block_tables and seq_lens must be int32")
    if block_tables.dim() != 2 or block_tables.shape[0] != q.shape[0] or seq_lens.shape != (q.shape[0],):
        raise ValueError(f"need block_tables (B, max_blocks) and seq_lens (B,) for B = {q.shape[0]}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or block_tables.stride(1) != 1:
        raise ValueError("q, the caches and block_tables need a contiguous last dimension")
    if k_cache.dtype in KV_QMAX:
        if k_scale is None or v_scale is None or k_scale.shape != (nb, bs, hkv) or v_scale.shape != k_scale.shape:
            raise ValueError(f"a {k_cache.dtype} cache needs k_scale/v_scale of shape {(nb, bs, hkv)}")
        if k_scale.dtype != torch.float32 or k_scale.stride() != v_scale.stride() or k_scale.stride(2) != 1:
            raise ValueError("k_scale/v_scale must be float32 with the same strides and a contiguous last dim")
    elif k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"an unquantized cache must have q's dtype {q.dtype}, got {k_cache.dtype}")


def _num_splits(batch_kv: int, max_ctx: int, device: torch.device) -> int:
    """Enough programs for ~2 waves over the SMs, each split at least 256 tokens long."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    if batch_kv >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, batch_kv), triton.cdiv(max_ctx, 256), 64))


def _launch(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor, scale: float,
            k_scale: Tensor | None, v_scale: Tensor | None, num_splits: int | None = None,
            config: tuple[int, int, int] | None = None) -> Tensor:
    """num_splits None = chosen from the batch and table width; config = (BLOCK_N, warps, stages) or None."""
    _check(q, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale)
    bsz, n_heads, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (B, H, D)
    if bsz == 0:
        return out
    quant = k_cache.dtype in KV_QMAX
    if config is None and _interpreting():
        config = (16, 4, 1)
    max_ctx = max(block_tables.shape[1] * bs, 1)
    splits = _num_splits(bsz * hkv, max_ctx, q.device) if num_splits is None else num_splits
    align = _SPLIT_ALIGN if config is None else config[0]
    per_split = triton.cdiv(triton.cdiv(max_ctx, splits), align) * align
    splits = triton.cdiv(max_ctx, per_split)
    if splits > 1:
        pm = torch.empty(bsz, n_heads, splits, dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        pa = torch.empty(bsz, n_heads, splits, d, dtype=torch.float32, device=q.device)
    else:
        pm = pl = pa = out  # unused
    ks = k_scale if quant else out
    vs = v_scale if quant else out
    sb, ss = (k_scale.stride(0), k_scale.stride(1)) if quant else (0, 0)
    group = n_heads // hkv
    args = (q, k_cache, v_cache, ks, vs, block_tables, seq_lens, out, pm, pl, pa, scale * _LOG2E,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), sb, ss, block_tables.stride(0),
            out.stride(0), out.stride(1), per_split, triton.next_power_of_2(per_split))
    meta = dict(GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, BLOCK_SIZE=bs,
                QUANT=quant, SPLIT=splits > 1, F32_DOT=_interpreting() and q.dtype == torch.bfloat16)
    grid = (bsz, hkv, splits)
    if config is None:
        _tuned[grid](*args, **meta)
    else:
        _kernel[grid](*args, **meta, BLOCK_N=config[0], num_warps=config[1], num_stages=config[2])
    if splits > 1:
        _merge_kernel[(bsz, n_heads)](pm, pl, pa, out, out.stride(0), out.stride(1), n_heads, splits,
                                      HEAD_DIM=d, SPLITS_P=triton.next_power_of_2(splits))
    return out


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                    scale: float | None = None, k_scale: Tensor | None = None,
                    v_scale: Tensor | None = None) -> Tensor:
    """Decode attention: q (B, H, D) over the first seq_lens[b] cached tokens of each sequence ->
    (B, H, D); same contract as `ref.paged_attention_ref`."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _launch(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale)


@triton.jit
def _round_half_even(y):
    r = tl.floor(y + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - y) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _round_to_e4m3(y):
    """Round fp32 |y| <= 448 to the nearest e4m3 value (ties to even), so the cast below is exact
    (the interpreter's own fp8 cast drops the carry when rounding crosses a power of two)."""
    bits = y.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127  # unbiased exponent
    ue = tl.maximum(e, -6) - 3  # ulp = 2^ue (subnormals: 2^-9)
    ulp = ((ue + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - ue) << 23).to(tl.float32, bitcast=True)  # exact reciprocal of a power of two
    r = _round_half_even(tl.abs(y) * inv) * ulp
    return tl.where(bits < 0, -r, r)  # the sign survives rounding to zero (-0 codes 0x80, as PyTorch's cast)


@triton.jit
def _store_row(X, C, S, t, slot, kvh, stride_xt, stride_xh, stride_cb, stride_cs, stride_ch, stride_sb, stride_ss,
               offs_d, QUANT: tl.constexpr, IS_INT8: tl.constexpr, QMAX: tl.constexpr, BLOCK_SIZE: tl.constexpr,
               RECIP: tl.constexpr):
    """One (token, kv head) row of K or V into its cache slot, quantized as `ref.quantize_kv_ref` does."""
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    x = tl.load(X + t * stride_xt + kvh * stride_xh + offs_d).to(tl.float32)  # (D,)
    dst = C + blk * stride_cb + off * stride_cs + kvh * stride_ch + offs_d
    if QUANT:
        amax = tl.max(tl.abs(x), 0)
        if RECIP:  # PyTorch on CUDA divides by a Python scalar as a multiply by its fp32 reciprocal
            sc = tl.where(amax > 0, amax * (1.0 / QMAX), 1.0)
        else:  # on CPU it divides
            sc = tl.where(amax > 0, tl.math.div_rn(amax, QMAX), 1.0)
        y = tl.math.div_rn(x, sc)
        if IS_INT8:
            y = tl.minimum(tl.maximum(_round_half_even(y), -QMAX), QMAX)
            tl.store(dst, y.to(tl.int8))
        else:
            y = _round_to_e4m3(tl.minimum(tl.maximum(y, -QMAX), QMAX))
            tl.store(dst, y.to(C.dtype.element_ty))
        tl.store(S + blk * stride_sb + off * stride_ss + kvh, sc)
    else:
        tl.store(dst, x.to(C.dtype.element_ty))


@triton.jit
def _write_kernel(K, V, KC, VC, KS, VS, SM, stride_kt, stride_kh, stride_vt, stride_vh,
                  stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_sb, stride_ss,
                  HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr, IS_INT8: tl.constexpr,
                  QMAX: tl.constexpr, RECIP: tl.constexpr):
    """Grid (T, Hkv): token t's kv head row of K and of V. Negative slots (padding tokens) are skipped."""
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    slot = tl.load(SM + t)
    if slot < 0:
        return
    offs_d = tl.arange(0, HEAD_DIM)
    _store_row(K, KC, KS, t, slot, kvh, stride_kt, stride_kh, stride_kcb, stride_kcs, stride_kch, stride_sb,
               stride_ss, offs_d, QUANT, IS_INT8, QMAX, BLOCK_SIZE, RECIP)
    _store_row(V, VC, VS, t, slot, kvh, stride_vt, stride_vh, stride_vcb, stride_vcs, stride_vch, stride_sb,
               stride_ss, offs_d, QUANT, IS_INT8, QMAX, BLOCK_SIZE, RECIP)


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
             k_scale: Tensor | None = None, v_scale: Tensor | None = None) -> None:
    """Store new tokens' K/V (T, Hkv, D) at flat slots `slot_mapping` (T,) int64 (block * block_size +
    offset) of the paged cache, quantizing per (token, head) into int8/fp8 caches with float32 scales
    in k_scale/v_scale, bit for bit as `ref.write_kv_ref` does on the same device (its `amax / qmax`
    is a true division on CPU, a reciprocal multiply on CUDA; the kernel follows). Unlike the reference, a negative slot (a padding
    token) is skipped rather than indexed from the end."""
    nb, bs, hkv, d = k_cache.shape
    if k.dim() != 3 or k.shape != v.shape or k.shape[1:] != (hkv, d) or v_cache.shape != k_cache.shape:
        raise ValueError(f"need k/v (T, {hkv}, {d}) for caches {tuple(k_cache.shape)}, got {tuple(k.shape)}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError("slot_mapping must be an int64 (T,) tensor")
    if bs & (bs - 1) or d & (d - 1):
        raise ValueError("block_size and head dim must be powers of two")
    if k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("k, v and the caches need a contiguous last dimension")
    quant = k_cache.dtype in KV_QMAX
    if quant and (k_scale is None or v_scale is None or k_scale.shape != (nb, bs, hkv)
                  or k_scale.stride() != v_scale.stride() or k_scale.stride(2) != 1):
        raise ValueError(f"a quantized KV cache needs k_scale/v_scale of shape {(nb, bs, hkv)} (same strides)")
    if k.shape[0] == 0:
        return
    ks = k_scale if quant else k_cache
    vs = v_scale if quant else v_cache
    sb, ss = (k_scale.stride(0), k_scale.stride(1)) if quant else (0, 0)
    _write_kernel[(k.shape[0], hkv)](
        k, v, k_cache, v_cache, ks, vs, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), sb, ss, HEAD_DIM=d, BLOCK_SIZE=bs, QUANT=quant, IS_INT8=k_cache.dtype == torch.int8,
        QMAX=KV_QMAX.get(k_cache.dtype, 1.0), RECIP=not _interpreting(), num_warps=1 if d <= 64 else 2)
