"""FlashAttention-2 style prefill over packed variable-length sequences (Triton).

`flash_attention_varlen` is the Triton twin of `ref.flash_attention_varlen_ref`: q (total_q, H, D),
k/v (total_k, Hkv, D) packed along tokens with int32 `cu_seqlens_q/k` (B+1,), GQA by integer head
groups (query head h reads kv head h // (H // Hkv)), bottom-right causal masking (query i of a
sequence sits at key position Lk - Lq + i, so a chunk of new tokens attends to its whole cached
prefix), softmax in fp32 with the online (running max / running sum) rescaling of FlashAttention-2.
One program owns BLOCK_M query rows of one head of one sequence and streams that sequence's K/V in
BLOCK_N tiles: first the tiles every row may see (no masks at all), then the few diagonal tiles
that need the causal and length masks. Head dims 64 and 128 (any power of two 16..256 works),
fp16/bf16. Limits: every sequence needs Lk >= Lq when causal (a row that sees no key is undefined,
as in the reference); the last dimension must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, KD, VD, row0, col0, qpos, lo, hi,
                  seqlen_k, qk_scale, offs_n, offs_d, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
                  F32_DOT: tl.constexpr, TMA: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) with key tiles [lo, hi) of one sequence/head. Whole
    tiles come through the tensor descriptors KD/VD (TMA) when TMA, else through pointers."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        kn = start_n + offs_n  # (BLOCK_N,)
        if MASKED:
            kmask = kn < seqlen_k
            k = tl.load(k_base + kn[:, None] * stride_kt + offs_d[None, :], mask=kmask[:, None], other=0.0)
            v = tl.load(v_base + kn[:, None] * stride_vt + offs_d[None, :], mask=kmask[:, None], other=0.0)
        elif TMA:  # whole tiles inside the sequence: bulk copies, no masks
            k = KD.load([row0 + start_n, col0])  # (BLOCK_N, D)
            v = VD.load([row0 + start_n, col0])
        else:
            k = tl.load(k_base + kn[:, None] * stride_kt + offs_d[None, :])  # (BLOCK_N, D)
            v = tl.load(v_base + kn[:, None] * stride_vt + offs_d[None, :])  # (BLOCK_N, D)
        if F32_DOT:  # the interpreter's bf16 dot multiplies raw bits; same products in fp32
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
        else:
            s = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N)
        if MASKED:
            ok = (kn[None, :] <= qpos[:, None]) & (kn[None, :] < seqlen_k)
            s = tl.where(ok, s * qk_scale, float("-inf"))  # log2 domain
            m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
            s = s - m_new[:, None]
        else:  # scale folded into one multiply-add (qk_scale > 0)
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            s = s * qk_scale - m_new[:, None]
        p = tl.math.exp2(s)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if F32_DOT:
            acc = tl.dot(p, v.to(tl.float32), acc)  # p unrounded: the interpreter's bf16 cast truncates
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)  # (BLOCK_M, D), accumulated in place
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _kernel(Q, K, V, KD, VD, Out, cu_q, cu_k, qk_scale,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
            seq_bucket, GROUP: tl.constexpr, IS_CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
            F32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """Grid (cdiv(max_seqlen_q, BLOCK_M), H, B); the largest query tiles (most causal work) go first.
    KD/VD: descriptors over k/v viewed as (total_k, Hkv * D) with (BLOCK_N, D) blocks, when TMA."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_q + seq)
    seqlen_q = tl.load(cu_q + seq + 1) - q_start
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    k_start = tl.load(cu_k + seq)
    seqlen_k = tl.load(cu_k + seq + 1) - k_start
    kvh = head // GROUP

    offs_m = m0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows within the sequence
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qmask = offs_m < seqlen_q
    q_ptrs = Q + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=qmask[:, None], other=0.0)  # (BLOCK_M, D)
    k_base = K + k_start * stride_kt + kvh * stride_kh
    v_base = V + k_start * stride_vt + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if IS_CAUSAL:
        qpos = offs_m + (seqlen_k - seqlen_q)  # (BLOCK_M,) key position of each query row
        # keys [0, full_hi) are visible to every row of the tile; [full_hi, hi) need masks
        first = m0 + seqlen_k - seqlen_q  # smallest visible-key bound in the tile
        full_hi = tl.maximum(first + 1, 0) // BLOCK_N * BLOCK_N
        full_hi = tl.minimum(full_hi, seqlen_k // BLOCK_N * BLOCK_N)
        hi = tl.minimum(first + BLOCK_M, seqlen_k)
    else:
        qpos = offs_m + seqlen_k  # every key is visible
        full_hi = seqlen_k // BLOCK_N * BLOCK_N
        hi = seqlen_k
    col0 = kvh * HEAD_DIM
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, KD, VD, k_start, col0,
                                  qpos, 0, full_hi, seqlen_k, qk_scale, offs_n, offs_d, False, BLOCK_N, F32_DOT, TMA)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, KD, VD, k_start, col0,
                                  qpos, full_hi, hi, seqlen_k, qk_scale, offs_n, offs_d, True, BLOCK_N, F32_DOT, TMA)
    out = acc / l_i[:, None]
    o_ptrs = Out + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=qmask[:, None])


def _set_blocks(nargs: dict) -> None:
    """Autotune pre-hook: the descriptors' block shape follows the config's BLOCK_N."""
    for name in ("KD", "VD"):
        if isinstance(nargs[name], TensorDescriptor):
            nargs[name].block_shape = [nargs["BLOCK_N"], nargs["HEAD_DIM"]]


def _configs() -> list[triton.Config]:
    """Hopper tiles (H100/H200), (BLOCK_M, BLOCK_N, warps, stages, TMA). With head dim 128 only 8 warps
    keep a 128-row tile's accumulator, scores and q in registers (4 warps spill ~1 KB a thread, seen
    in the sm_90 build); the pointer-load variant does not multi-buffer, so one stage count serves it."""
    table = [(128, 64, 8, 3, False), (128, 64, 8, 2, True), (128, 64, 8, 3, True), (128, 64, 8, 4, True),
             (128, 128, 8, 3, False), (128, 128, 8, 2, True), (128, 128, 8, 3, True),
             (64, 64, 4, 3, False), (64, 64, 4, 3, True), (128, 64, 4, 3, True)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "TMA": tma}, num_warps=w, num_stages=st,
                          pre_hook=_set_blocks) for bm, bn, w, st, tma in table]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """No TMA configs when k/v could not be described (unaligned strides, pre-Hopper GPU); no
    4-warp 128-row tiles above head dim 64 (they spill)."""
    tma_ok = isinstance(named_args["KD"], TensorDescriptor)
    big = kwargs.get("HEAD_DIM", 128) > 64
    return [c for c in configs if (tma_ok or not c.kwargs["TMA"])
            and not (big and c.num_warps == 4 and c.kwargs["BLOCK_M"] == 128)]


_tuned = triton.autotune(configs=_configs(), key=["seq_bucket", "GROUP", "IS_CAUSAL", "HEAD_DIM"],
                         prune_configs_by={"early_config_prune": _prune})(_kernel)


def _interpreting() -> bool:
    """Whether this module's kernels were built for the interpreter (TRITON_INTERPRET=1 at import, the
    CPU tests): then small tiles are used and bf16 dots run in fp32."""
    return not isinstance(_kernel, triton.runtime.JITFunction)


def _check(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"need q (total_q, H, D) and k/v (total_k, Hkv, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    d = q.shape[2]
    if k.shape[2] != d or d not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim must match and be a power of two 16..256, got q {d}, k {k.shape[2]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of kv heads {k.shape[1]}")
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q/k/v must share fp16 or bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("q/k/v need a contiguous last (head) dimension")
    if cu_q.dtype != torch.int32 or cu_k.dtype != torch.int32 or cu_q.shape != cu_k.shape or cu_q.dim() != 1:
        raise ValueError("cu_seqlens_q/k must be int32 (B+1,) tensors of the same length")
    if len({q.device, k.device, v.device, cu_q.device, cu_k.device}) != 1:
        raise ValueError("all tensors must be on one device")


def _descriptor(x: Tensor, block_n: int) -> TensorDescriptor | None:
    """x (T, Hkv, D) as a 2-D (T, Hkv * D) TMA descriptor, where the layout allows one (heads packed,
    16-byte aligned rows and base) on a Hopper-or-newer GPU or under the interpreter."""
    t, hkv, d = x.shape
    if not (_interpreting() or (x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9)):
        return None
    es = x.element_size()
    if t == 0 or (x.stride(1) != d and hkv > 1) or (x.stride(0) * es) % 16 or x.data_ptr() % 16:
        return None
    return TensorDescriptor(x, [t, hkv * d], [x.stride(0), 1], [block_n, d])


def _launch(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_seqlen_q: int, causal: bool,
            scale: float, config: tuple[int, int, int, int, bool] | None) -> Tensor:
    """config = (BLOCK_M, BLOCK_N, num_warps, num_stages, TMA) or None to autotune."""
    _check(q, k, v, cu_q, cu_k)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (total_q, H, D)
    n_seq = cu_q.shape[0] - 1
    if n_seq == 0 or max_seqlen_q == 0 or q.shape[0] == 0:
        return out
    h, d = q.shape[1], q.shape[2]
    bn = 64 if config is None else config[1]
    kd, vd = _descriptor(k, bn), _descriptor(v, bn)
    if kd is None or vd is None:
        kd = vd = k  # unused: pointer loads only
    args = (q, k, v, kd, vd, out, cu_q, cu_k, scale * _LOG2E, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), out.stride(0), out.stride(1), min(triton.next_power_of_2(max_seqlen_q), 8192))
    meta = dict(GROUP=h // k.shape[1], IS_CAUSAL=causal, HEAD_DIM=d, F32_DOT=_interpreting() and q.dtype == torch.bfloat16)
    if config is None and _interpreting():
        config = (16, 16, 4, 1, False)
    if config is None:
        def grid(m):
            return (triton.cdiv(max_seqlen_q, m["BLOCK_M"]), h, n_seq)
        _tuned[grid](*args, **meta)
    else:
        bm, bn, warps, stages, tma = config
        if tma and not isinstance(kd, TensorDescriptor):
            raise ValueError("TMA asked for, but k/v cannot be described (layout or device)")
        _kernel[(triton.cdiv(max_seqlen_q, bm), h, n_seq)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, TMA=tma,
                                                           num_warps=warps, num_stages=stages)
    return out


def flash_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                           scale: float | None = None) -> Tensor:
    """Packed varlen attention (scale > 0): q (total_q, H, D), k/v (total_k, Hkv, D), cu_seqlens_* (B+1,) int32,
    max_seqlen_q/k the longest sequence lengths (host ints, so no device sync) -> (total_q, H, D).
    Same semantics as `ref.flash_attention_varlen_ref`; `max_seqlen_k` is accepted for API parity
    with flash-attn (the kernel reads each sequence's key length from cu_seqlens_k)."""
    del max_seqlen_k
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _launch(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), bool(causal), scale, None)
