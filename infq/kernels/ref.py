"""Plain-PyTorch oracles for every kernel, also the CPU fallbacks.

Each function here states the contract its Triton twin implements (shapes, dtypes, layouts); the
tests compare the Triton kernels under `TRITON_INTERPRET=1` (and compiled, on a GPU) with these.
Attention layouts follow vLLM / flash-attn so the runtime and the kernels share one vocabulary:

- packed varlen sequences: q (total_q, H, D), k/v (total_k, Hkv, D) with `cu_seqlens` int32 offsets;
- the paged KV cache of one layer: k_cache/v_cache (num_blocks, block_size, Hkv, D); a sequence's
  block table is a row of int32 block ids (unused entries -1); token t of the sequence lives at
  block_table[t // block_size], slot t % block_size;
- quantized KV (int8 / fp8 e4m3): one float32 scale per (block, slot, kv head), in tensors
  k_scale/v_scale (num_blocks, block_size, Hkv); value = code * scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from infq.quantizers.scheme import QuantizedTensor

KV_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def _expand_kv(k: Tensor, n_heads: int) -> Tensor:
    """(T, Hkv, D) -> (T, H, D) by repeating each kv head for its query group (GQA)."""
    rep = n_heads // k.shape[1]
    return k if rep == 1 else k.repeat_interleave(rep, dim=1)


def attention_ref(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None) -> Tensor:
    """One sequence: q (Tq, H, D), k/v (Tk, Hkv, D) -> (Tq, H, D), softmax in fp32.

    Causal masks are bottom-right aligned (query i sits at key position Tk - Tq + i), as in
    flash-attn: a chunk of new tokens attends to the whole cached prefix and causally to itself."""
    tq, n_heads, d = q.shape
    tk = k.shape[0]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kf, vf = _expand_kv(k, n_heads).float(), _expand_kv(v, n_heads).float()
    s = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale  # (H, Tq, Tk)
    if causal:
        qpos = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
        s = s.masked_fill(torch.arange(tk, device=q.device)[None, :] > qpos, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hqk,khd->qhd", p, vf).to(q.dtype)  # (Tq, H, D)


def flash_attention_varlen_ref(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                               causal: bool = True, scale: float | None = None) -> Tensor:
    """Packed variable-length sequences: q (total_q, H, D), k/v (total_k, Hkv, D), cu_seqlens_*
    (B+1,) int32 -> (total_q, H, D). Sequence b is rows cu[b]:cu[b+1] of each."""
    out = torch.empty_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        if cq[b + 1] > cq[b]:
            out[cq[b]:cq[b + 1]] = attention_ref(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]],
                                                 causal, scale)
    return out


def quantize_kv_ref(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-(token, head) symmetric quantization of K or V rows: x (T, Hkv, D) -> codes (T, Hkv, D)
    in `dtype` (int8 or float8_e4m3fn) and float32 scales (T, Hkv)."""
    qmax = KV_QMAX[dtype]
    amax = x.float().abs().amax(dim=-1)  # (T, Hkv)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    y = x.float() / scale[..., None]
    codes = y.round().clamp(-qmax, qmax).to(dtype) if dtype == torch.int8 else y.clamp(-qmax, qmax).to(dtype)
    return codes, scale


def write_kv_ref(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
                 k_scale: Tensor | None = None, v_scale: Tensor | None = None) -> None:
    """Store new tokens' K/V (T, Hkv, D) into the paged cache at flat slots `slot_mapping` (T,)
    int64 = block * block_size + offset; quantizes when the cache dtype is int8/fp8 (scales into
    k_scale/v_scale (num_blocks, block_size, Hkv))."""
    nb, bs = k_cache.shape[:2]
    kc, vc = k_cache.view(nb * bs, *k_cache.shape[2:]), v_cache.view(nb * bs, *v_cache.shape[2:])
    if k_cache.dtype in KV_QMAX:
        assert k_scale is not None and v_scale is not None, "a quantized KV cache needs scale tensors"
        kq, ks = quantize_kv_ref(k, k_cache.dtype)
        vq, vs = quantize_kv_ref(v, v_cache.dtype)
        kc[slot_mapping], vc[slot_mapping] = kq, vq
        k_scale.view(nb * bs, -1)[slot_mapping] = ks
        v_scale.view(nb * bs, -1)[slot_mapping] = vs
    else:
        kc.index_copy_(0, slot_mapping, k.to(kc.dtype))  # index_copy_: fewer dispatches than kc[slots] = k
        vc.index_copy_(0, slot_mapping, v.to(vc.dtype))


def gather_kv_ref(cache: Tensor, block_table: Tensor, seq_len: int, scale: Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """The first `seq_len` tokens of one sequence from a paged cache: (seq_len, Hkv, D) in `dtype`,
    dequantized when `scale` (num_blocks, block_size, Hkv) is given."""
    bs = cache.shape[1]
    n = -(-seq_len // bs)
    blocks = block_table[:n].long()
    x = cache[blocks].reshape(n * bs, *cache.shape[2:])[:seq_len]  # (seq_len, Hkv, D)
    if scale is None:
        return x.to(dtype)
    s = scale[blocks].reshape(n * bs, -1)[:seq_len]  # (seq_len, Hkv)
    return (x.float() * s[..., None]).to(dtype)


def paged_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                        scale: float | None = None, k_scale: Tensor | None = None,
                        v_scale: Tensor | None = None) -> Tensor:
    """Decode attention, one query token per sequence: q (B, H, D) attends to the first
    seq_lens[b] cached tokens of sequence b (its own token included, already written) ->
    (B, H, D). block_tables (B, max_blocks) int32, seq_lens (B,) int32."""
    out = torch.empty_like(q)
    for b, n in enumerate(seq_lens.tolist()):
        k = gather_kv_ref(k_cache, block_tables[b], n, k_scale, torch.float32)
        v = gather_kv_ref(v_cache, block_tables[b], n, v_scale, torch.float32)
        out[b] = attention_ref(q[b:b + 1].float(), k, v, causal=False, scale=scale)[0].to(q.dtype)
    return out


def sdpa_gqa(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None) -> Tensor:
    """One sequence through PyTorch's SDPA (the CPU fast path): q (Tq, H, D), k/v (Tk, Hkv, D) ->
    (Tq, H, D), bottom-right causal like `attention_ref`."""
    tq, n_heads, _ = q.shape
    tk = k.shape[0]
    qh = q.transpose(0, 1)  # (H, Tq, D)
    kh, vh = _expand_kv(k, n_heads).transpose(0, 1), _expand_kv(v, n_heads).transpose(0, 1)  # (H, Tk, D)
    if causal and tq > 1:
        if tq == tk:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
        else:
            qpos = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
            mask = torch.arange(tk, device=q.device)[None, :] <= qpos  # (Tq, Tk) True = attend
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    else:
        o = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    return o.transpose(0, 1)  # (Tq, H, D)


# ------------------------------------------------------------------------------------------------
# Fused small ops (RMSNorm with residual add, SiLU-gate multiply, rotary embedding): the oracles of
# kernels/fused.py, written as runtime/model.py computes them (each op in the input's dtype, RMSNorm's
# statistics in fp32).
# ------------------------------------------------------------------------------------------------

def rms_norm_ref(x: Tensor, weight: Tensor, eps: float,
                 residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """x (..., C), weight (C,) -> weight * normalize(x) (..., C). With `residual` (..., C) the sum
    h = x + residual (in x's dtype) is normalized and (out, h) is returned, h being the next residual."""
    h = x if residual is None else x + residual
    h32 = h.float()
    out = weight * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return out if residual is None else (out, h)


def silu_mul_ref(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU's gate: silu(gate) * up, both (..., F)."""
    return F.silu(gate) * up


def rotary_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Neox-style (half-rotate) rotary embedding: x (T, H, D), cos/sin (T, D) with the two halves
    equal (runtime.model.Rope's tables) -> x * cos + rotate_half(x) * sin (T, H, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


# ------------------------------------------------------------------------------------------------
# Quantized linears. `quant_linear_ref` is the oracle of every weight-only kernel (CPU packed paths
# in kernels/dispatch.py, Triton dequant-GEMM): x @ dequantize(qt)ᵀ (+ b) in float64. FP8 (E4M3FN)
# products (reference §B.3): `Y = (X8 · W8ᵀ) · s_x · s_w (+ b)` with W8 (N, K) e4m3 codes, s_w (N, 1)
# (per-channel, or one value repeated for per-tensor) and X8 the activations quantized per `act`:
#   "static":  one calibrated scale s_x for the whole tensor (saturating at ±448),
#   "dynamic": one scale per token (row), max_j |x_tj| / 448, computed at every call,
#   "none":    no activation quantization (weight-only; the weight is dequantized).
# `fp8_linear_ref` computes that product in float32 from the quantized values (the CPU path and the
# oracle of `dispatch.fp8_linear_scaled_mm`).
# ------------------------------------------------------------------------------------------------

E4M3_MAX = 448.0
ACT_SCHEMES = ("static", "dynamic", "none")
_TINY = torch.finfo(torch.float32).tiny  # scale of an all-zero token: its codes are 0 whatever it is


def quant_linear_ref(x: Tensor, qt: QuantizedTensor, bias: Tensor | None = None) -> Tensor:
    """x (..., K) @ dequantize(qt)ᵀ (N, K) (+ bias (N,)) in float64 -> (..., N) float64."""
    y = x.double() @ qt.dequantize(torch.float32).double().T  # (..., N)
    return y if bias is None else y + bias.double()


def to_e4m3(x: Tensor) -> Tensor:
    """Saturating cast to float8_e4m3fn (PyTorch's own cast saturates only on some builds/devices)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_act(x: Tensor, act: str, input_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """Activations (M, K) -> (e4m3 codes (M, K), float32 scale () for static or (M, 1) per token)."""
    x32 = x.to(torch.float32)  # (M, K)
    if act == "static":
        assert input_scale is not None
        s = input_scale.to(x.device, torch.float32).reshape(())
        return to_e4m3(x32 / s), s
    s = (x32.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(_TINY)  # (M, 1)
    return to_e4m3(x32 / s), s


def fp8_linear_ref(x: Tensor, codes: Tensor, w_scale: Tensor, bias: Tensor | None, act: str,
                   input_scale: Tensor | None = None, weight: Tensor | None = None) -> Tensor:
    """Reference FP8 linear in float32 from the quantized operands; returns x's dtype (..., N).
    `weight`: codes * w_scale in float32 computed earlier (the CPU runtime keeps it; exact)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # (M, K)
    if act == "none":
        xq = x2.to(torch.float32)
    else:
        x8, s = quantize_act(x2, act, input_scale)
        xq = x8.to(torch.float32) * s  # (M, K), exact in fp32
    w = weight if weight is not None else codes.to(torch.float32) * w_scale.to(torch.float32)  # (N, K)
    y = F.linear(xq, w, None if bias is None else bias.to(torch.float32))  # (M, N)
    return y.to(x.dtype).reshape(*shape[:-1], codes.shape[0])


# ------------------------------------------------------------------------------------------------
# Dequant-GEMM (kernels/dequant_gemm.py). The Triton kernels' contract: y = x @ Wᵀ (+ b) where W is
# the reference decoding of the QuantizedTensor (int, fp8 or gguf:<TYPE>) in float32, accumulated in
# float32 and rounded once to x's dtype. `dequant_gemm_torch` is what PyTorch itself computes in the
# activation precision (W rounded to x's dtype, then x's-dtype matmul): the tests' error baseline.
# ------------------------------------------------------------------------------------------------


def dequant_gemm_ref(x: Tensor, qt: QuantizedTensor, bias: Tensor | None = None) -> Tensor:
    """x (..., K) fp16/bf16 -> (..., N) in x's dtype: float32 x @ dequantize(qt)ᵀ (+ bias)."""
    w = qt.dequantize(torch.float32).to(x.device)  # (N, K)
    y = F.linear(x.float(), w, None if bias is None else bias.float())  # (..., N) fp32
    return y.to(x.dtype)


def dequant_gemm_torch(x: Tensor, qt: QuantizedTensor, bias: Tensor | None = None) -> Tensor:
    """The same product as PyTorch computes it in x's precision: W dequantized to x's dtype, then
    F.linear in that dtype -> (..., N)."""
    w = qt.dequantize(torch.float32).to(x.device, x.dtype)  # (N, K)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
