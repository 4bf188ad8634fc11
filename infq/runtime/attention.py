"""Attention over the paged KV cache for one engine step, behind one interface per device.

The engine flattens every scheduled token of every request into one batch (`PagedBatch`: the
slot each token's K/V goes to, each request's block table, context length and query length). Each
decoder block hands its rotated q, k, v to `PagedLayer.attend`, which writes k, v into the cache and
attends every query to its request's cached tokens: queries of a prefill chunk causally
(bottom-right aligned, so a chunk sees the whole cached prefix), a decode token to everything.

Backends: `torch` (the CPU path, and the fallback everywhere): KV written by `kernels.ref.write_kv_ref`,
decode tokens of all requests in one SDPA call over their gathered (dequantized) KV with a length
mask, prefill chunks one SDPA call per request. `triton` (CUDA, when the kernels are present):
`kernels.paged_attention` for KV writes and decode, and one `kernels.flash_attention` varlen call
for all prefill chunks of the step, same layouts. Sliding windows (Mistral) and fp32 models use
the torch path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from infq.kernels.ref import write_kv_ref
from infq.runtime.kv_cache import KVCache


@dataclass
class PagedBatch:
    """Attention metadata of one step: B requests, N tokens in request order."""

    slot_mapping: Tensor  # (N,) int64: block * block_size + offset of each new token
    block_tables: Tensor  # (B, max_blocks) int32, -1 padded
    seq_lens: Tensor  # (B,) int32: context length after this step (cached + new)
    query_lens: list[int]  # new tokens per request
    seq_lens_host: list[int]
    cu_seqlens_q: Tensor  # (B+1,) int32
    decode_rows: Tensor  # (Bd,) int64: requests with one new token
    decode_tokens: Tensor  # (Bd,) int64: that token's row in the flattened batch
    decode_max_len: int  # longest context among the decode rows
    prefill_rows: list[int]  # requests with more than one new token
    prefill_tokens: Tensor  # (Np,) int64: their new tokens' rows in the flattened batch
    prefill_kv_slots: Tensor  # (Nk,) int64: flat cache slots of their whole contexts, request after request
    cu_q_prefill: Tensor  # (P+1,) int32 offsets into prefill_tokens
    cu_k_prefill: Tensor  # (P+1,) int32 offsets into prefill_kv_slots
    # Per-step values every layer shares (the torch backend's decode tables and masks), made once.
    memo: dict = field(default_factory=dict)
    # One request decoding one token over blocks b0, b0 + 1, ... (a lone request in a fresh pool):
    # (b0, context length), so the torch backend can slice the cache instead of gathering it.
    decode_span: tuple[int, int] | None = None


def build_batch(tables: list[list[int]], starts: list[int], counts: list[int], block_size: int,
                device: torch.device) -> PagedBatch:
    """Metadata for requests whose tokens starts[b]:starts[b]+counts[b] are computed this step."""
    slots: list[int] = []
    for table, s, n in zip(tables, starts, counts, strict=True):
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(s, s + n))
    width = max(len(t) for t in tables)
    padded = [t + [-1] * (width - len(t)) for t in tables]
    seq_lens = [s + n for s, n in zip(starts, counts, strict=True)]
    cu = [0]
    for n in counts:
        cu.append(cu[-1] + n)
    rows = [b for b, n in enumerate(counts) if n == 1]
    pre = [b for b, n in enumerate(counts) if n > 1]
    pre_tokens = [i for b in pre for i in range(cu[b], cu[b + 1])]
    kv_slots = [tables[b][p // block_size] * block_size + p % block_size for b in pre for p in range(seq_lens[b])]
    cu_q, cu_k = [0], [0]
    for b in pre:
        cu_q.append(cu_q[-1] + counts[b])
        cu_k.append(cu_k[-1] + seq_lens[b])

    def t(x: list, dtype: torch.dtype) -> Tensor:
        return torch.tensor(x, dtype=dtype, device=device)

    span = None
    if len(tables) == 1 and counts[0] == 1:
        blocks = tables[0][: -(-seq_lens[0] // block_size)]
        if blocks == list(range(blocks[0], blocks[0] + len(blocks))):
            span = (blocks[0], seq_lens[0])
    return PagedBatch(t(slots, torch.int64), t(padded, torch.int32), t(seq_lens, torch.int32), list(counts),
                      seq_lens, t(cu, torch.int32), t(rows, torch.int64), t([cu[b] for b in rows], torch.int64),
                      max((seq_lens[b] for b in rows), default=0), pre, t(pre_tokens, torch.int64),
                      t(kv_slots, torch.int64), t(cu_q, torch.int32), t(cu_k, torch.int32), decode_span=span)


def _gather(cache: Tensor, scale: Tensor | None, tables: Tensor, dtype: torch.dtype) -> Tensor:
    """(R, nb) block ids (>= 0) -> (R, nb * block_size, Hkv, D) in `dtype`, dequantized."""
    r, nb = tables.shape
    flat = tables.reshape(-1)  # index_select on dim 0 copies whole blocks: about 2x cache[tables] on a CPU
    x = cache.index_select(0, flat).view(r, nb * cache.shape[1], *cache.shape[2:])  # (R, L, Hkv, D)
    if scale is None:
        return x.to(dtype)
    s = scale.index_select(0, flat).view(r, nb * cache.shape[1], -1, 1)  # (R, L, Hkv, 1)
    return (x.float() * s).to(dtype)


def _key_mask(qpos: Tensor, length: int, window: int | None) -> Tensor:
    """(…, Tq) query positions -> (…, Tq, L) True where key j is visible (j <= pos, in window)."""
    kpos = torch.arange(length, device=qpos.device)
    dist = qpos[..., None] - kpos  # (…, Tq, L)
    mask = dist >= 0
    if window is not None:
        mask &= dist < window
    return mask


class TorchAttention:
    """Gather + SDPA: exact reference semantics, fast enough on a CPU."""

    name = "torch"

    def write(self, kv: KVCache, layer: int, k: Tensor, v: Tensor, batch: PagedBatch) -> None:
        ks, vs = kv.scales(layer)
        write_kv_ref(k, v, kv.k[layer], kv.v[layer], batch.slot_mapping, ks, vs)

    def decode(self, kv: KVCache, layer: int, q: Tensor, batch: PagedBatch, window: int | None) -> Tensor:
        """q (Bd, H, D) for the decode rows -> (Bd, H, D)."""
        bd, n_heads, d = q.shape
        if batch.decode_span is not None and window is None and not kv.quantized:
            b0, n = batch.decode_span  # one request over consecutive blocks: a view of the cache, no mask
            nb = -(-n // kv.block_size)
            k, v = (c[layer][b0:b0 + nb].flatten(0, 1)[:n].to(q.dtype).transpose(0, 1)[None] for c in (kv.k, kv.v))
            mask = None  # (1, Hkv, n, D) each; every key is visible
        else:
            tables, mask = self._decode_meta(kv.block_size, batch, window)
            ks, vs = kv.scales(layer)
            k = _gather(kv.k[layer], ks, tables, q.dtype).transpose(1, 2)  # (Bd, Hkv, L, D)
            v = _gather(kv.v[layer], vs, tables, q.dtype).transpose(1, 2)
        hkv = k.shape[1]
        qg = q.view(bd, hkv, n_heads // hkv, d)  # (Bd, Hkv, rep, D): a kv head's queries side by side
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)  # (Bd, Hkv, rep, D)
        return o.reshape(bd, n_heads, d)

    @staticmethod
    def _decode_meta(block_size: int, batch: PagedBatch, window: int | None) -> tuple[Tensor, Tensor]:
        """The decode rows' block tables (Bd, nb) and key mask (Bd, 1, 1, L), once per step and window."""
        key = ("decode", window)
        if key not in batch.memo:
            lens = batch.seq_lens[batch.decode_rows].long()  # (Bd,)
            nb = -(-batch.decode_max_len // block_size)
            tables = batch.block_tables[batch.decode_rows, :nb].clamp(min=0).long()  # (Bd, nb)
            mask = _key_mask(lens - 1, nb * block_size, window)[:, None, None, :]  # j < len (and in window)
            batch.memo[key] = tables, mask
        return batch.memo[key]

    def prefill_all(self, kv: KVCache, layer: int, q: Tensor, batch: PagedBatch, window: int | None,
                    out: Tensor) -> None:
        """Every prefill chunk of the step: rows of q (N, H, D) -> the same rows of out."""
        start = 0
        for b, n in enumerate(batch.query_lens):
            if n > 1:
                out[start:start + n] = self.prefill(kv, layer, q[start:start + n], b, batch, window)
            start += n

    def prefill(self, kv: KVCache, layer: int, q: Tensor, b: int, batch: PagedBatch, window: int | None) -> Tensor:
        """q (Tq, H, D) of request b's chunk -> (Tq, H, D), causal over its cached prefix."""
        n = batch.seq_lens_host[b]
        nb = -(-n // kv.block_size)
        tables = batch.block_tables[b:b + 1, :nb].long()  # (1, nb)
        ks, vs = kv.scales(layer)
        k = _gather(kv.k[layer], ks, tables, q.dtype)[0, :n]  # (n, Hkv, D)
        v = _gather(kv.v[layer], vs, tables, q.dtype)[0, :n]
        tq, n_heads, _ = q.shape
        rep = n_heads // k.shape[1]
        kh = k.repeat_interleave(rep, dim=1).transpose(0, 1) if rep > 1 else k.transpose(0, 1)  # (H, n, D)
        vh = v.repeat_interleave(rep, dim=1).transpose(0, 1) if rep > 1 else v.transpose(0, 1)
        qh = q.transpose(0, 1)  # (H, Tq, D)
        if tq == n and window is None:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
        else:
            qpos = torch.arange(n - tq, n, device=q.device)
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=_key_mask(qpos, n, window))
        return o.transpose(0, 1)  # (Tq, H, D)


class TritonAttention(TorchAttention):
    """The CUDA kernels of `infq.kernels` behind the same calls: KV writes, paged decode, and every
    prefill chunk of the step in one varlen FlashAttention call over their gathered contexts. The
    kernels take fp16/bf16 queries; fp32 models and sliding windows use the torch path."""

    name = "triton"

    def __init__(self) -> None:
        from infq.kernels import flash_attention, paged_attention

        self.fa, self.pa = flash_attention, paged_attention

    @staticmethod
    def _native(q: Tensor, window: int | None) -> bool:
        return window is None and q.dtype in (torch.float16, torch.bfloat16)

    def write(self, kv: KVCache, layer: int, k: Tensor, v: Tensor, batch: PagedBatch) -> None:
        ks, vs = kv.scales(layer)
        self.pa.write_kv(k, v, kv.k[layer], kv.v[layer], batch.slot_mapping, ks, vs)

    def decode(self, kv: KVCache, layer: int, q: Tensor, batch: PagedBatch, window: int | None) -> Tensor:
        if not self._native(q, window):
            return super().decode(kv, layer, q, batch, window)
        ks, vs = kv.scales(layer)
        rows = batch.decode_rows
        return self.pa.paged_attention(q, kv.k[layer], kv.v[layer], batch.block_tables[rows],
                                       batch.seq_lens[rows], 1 / math.sqrt(q.shape[-1]), ks, vs)

    def prefill_all(self, kv: KVCache, layer: int, q: Tensor, batch: PagedBatch, window: int | None,
                    out: Tensor) -> None:
        if not self._native(q, window):
            return super().prefill_all(kv, layer, q, batch, window, out)
        slots = batch.prefill_kv_slots
        ks, vs = kv.scales(layer)
        k = _gather_slots(kv.k[layer], ks, slots, q.dtype)  # (Nk, Hkv, D)
        v = _gather_slots(kv.v[layer], vs, slots, q.dtype)
        q_pre = q[batch.prefill_tokens]  # (Np, H, D)
        max_q = max(batch.query_lens[b] for b in batch.prefill_rows)
        max_k = max(batch.seq_lens_host[b] for b in batch.prefill_rows)
        out[batch.prefill_tokens] = self.fa.flash_attention_varlen(q_pre, k, v, batch.cu_q_prefill, batch.cu_k_prefill,
                                                                   max_q, max_k, causal=True)


def _gather_slots(cache: Tensor, scale: Tensor | None, slots: Tensor, dtype: torch.dtype) -> Tensor:
    """Flat slots (N,) of a paged cache -> (N, Hkv, D) in `dtype`, dequantized."""
    x = cache.view(-1, *cache.shape[2:])[slots]  # (N, Hkv, D)
    if scale is None:
        return x.to(dtype)
    return (x.float() * scale.view(-1, scale.shape[2])[slots][..., None]).to(dtype)


def select_backend(device: torch.device, name: str = "auto") -> TorchAttention:
    """`auto`: the Triton kernels on CUDA when they import, else the torch path."""
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchAttention()
    try:
        return TritonAttention()
    except ImportError:
        if name == "triton":
            raise
        return TorchAttention()


class PagedLayer:
    """What a decoder block sees as its `cache` in the paged path: one layer of one step."""

    def __init__(self, backend: TorchAttention, kv: KVCache, layer: int, batch: PagedBatch) -> None:
        self.backend, self.kv, self.layer, self.batch = backend, kv, layer, batch

    def attend(self, q: Tensor, k: Tensor, v: Tensor, window: int | None) -> Tensor:
        """q (N, H, D), k/v (N, Hkv, D) of the step's new tokens -> attention output (N, H, D)."""
        batch, kv, layer = self.batch, self.kv, self.layer
        self.backend.write(kv, layer, k, v, batch)
        if not batch.prefill_rows:  # every token is a decode token, in request order
            return self.backend.decode(kv, layer, q, batch, window)
        out = torch.empty_like(q)
        if batch.decode_rows.numel():
            out[batch.decode_tokens] = self.backend.decode(kv, layer, q[batch.decode_tokens], batch, window)
        if batch.prefill_rows:
            self.backend.prefill_all(kv, layer, q, batch, window, out)
        return out
