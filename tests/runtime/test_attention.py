"""Paged attention of one engine step (torch backend) against kernels/ref.py's oracles: a batch
mixing decode tokens, a whole prefill and a prefill chunk over a cached prefix, with GQA, block
tables in scattered order, a sliding window, and int8 / fp8 KV."""

from __future__ import annotations

import pytest
import torch

from infq.kernels.ref import attention_ref, gather_kv_ref, write_kv_ref
from infq.runtime.arch import ModelConfig
from infq.runtime.attention import PagedLayer, TorchAttention, build_batch
from infq.runtime.kv_cache import KVCache

H, HKV, D, BS = 4, 2, 16, 4
TOL = {torch.float32: 1e-5, torch.int8: 1e-5, torch.float8_e4m3fn: 1e-5}


def _cfg():
    return ModelConfig.from_hf(dict(model_type="llama", hidden_size=H * D, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=H, num_key_value_heads=HKV, vocab_size=50,
                                    max_position_embeddings=128, rms_norm_eps=1e-5))


@pytest.mark.parametrize("storage", [torch.float32, torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("window", [None, 5])
# (cached tokens, new tokens): decode, decode, whole prefill, chunk over a prefix; or decode only
@pytest.mark.parametrize("shapes", [[(9, 1), (3, 1), (0, 7), (6, 5)], [(9, 1), (3, 1), (17, 1)]])
def test_step_matches_reference(storage, window, shapes):
    g = torch.Generator().manual_seed(0)
    kv = KVCache(_cfg(), 24, BS, storage, torch.device("cpu"))
    perm = torch.randperm(24, generator=g).tolist()
    tables = [perm[i * 6:(i + 1) * 6][: -(-(c + n) // BS)] for i, (c, n) in enumerate(shapes)]
    full_k = [torch.randn(c + n, HKV, D, generator=g) for c, n in shapes]
    full_v = [torch.randn(c + n, HKV, D, generator=g) for c, n in shapes]
    for t, (c, _), k, v in zip(tables, shapes, full_k, full_v, strict=True):  # the cached prefixes
        if c:
            slots = torch.tensor([t[p // BS] * BS + p % BS for p in range(c)])
            ks, vs = kv.scales(0)
            write_kv_ref(k[:c], v[:c], kv.k[0], kv.v[0], slots, ks, vs)
    batch = build_batch(tables, [c for c, _ in shapes], [n for _, n in shapes], BS, torch.device("cpu"))
    q = torch.randn(sum(n for _, n in shapes), H, D, generator=g)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, shapes, strict=True)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, shapes, strict=True)])
    out = PagedLayer(TorchAttention(), kv, 0, batch).attend(q, new_k, new_v, window)  # (N, H, D)
    start = 0
    ks, vs = kv.scales(0)
    for b, (c, n) in enumerate(shapes):
        bt = torch.tensor(tables[b])
        k = gather_kv_ref(kv.k[0], bt, c + n, ks)  # what the cache holds, dequantized by the oracle
        v = gather_kv_ref(kv.v[0], bt, c + n, vs)
        if storage == torch.float32:
            assert torch.equal(k, full_k[b]) and torch.equal(v, full_v[b])
        ref = _ref(q[start:start + n], k, v, window)
        assert (out[start:start + n] - ref).abs().max() <= TOL[storage]
        start += n


def _ref(q, k, v, window):
    if window is None:
        return attention_ref(q, k, v, causal=True)
    tq, tk = q.shape[0], k.shape[0]
    out = torch.empty_like(q)
    for i in range(tq):  # each query over its own window of keys
        pos = tk - tq + i
        lo = max(0, pos - window + 1)
        out[i] = attention_ref(q[i:i + 1], k[lo:pos + 1], v[lo:pos + 1], causal=False)[0]
    return out


@pytest.mark.parametrize("storage", [torch.float32, torch.int8])
@pytest.mark.parametrize("consecutive", [True, False])
def test_lone_decode_over_consecutive_blocks(storage, consecutive):
    """One request decoding one token over blocks b0, b0 + 1, ...: build_batch marks the span and
    the torch backend attends over a view of the cache (no gather, no mask); scattered blocks (and a
    quantized cache) take the gather path. Both equal the reference."""
    g = torch.Generator().manual_seed(3)
    kv = KVCache(_cfg(), 24, BS, storage, torch.device("cpu"))
    c = 13  # cached tokens; the new one makes 14, in 4 blocks of 4
    table = [5, 6, 7, 8] if consecutive else [5, 9, 6, 8]
    batch = build_batch([table], [c], [1], BS, torch.device("cpu"))
    assert batch.decode_span == ((5, c + 1) if consecutive else None)
    full_k, full_v = torch.randn(c + 1, HKV, D, generator=g), torch.randn(c + 1, HKV, D, generator=g)
    ks, vs = kv.scales(0)
    write_kv_ref(full_k[:c], full_v[:c], kv.k[0], kv.v[0], torch.tensor([table[p // BS] * BS + p % BS for p in range(c)]),
                 ks, vs)
    q = torch.randn(1, H, D, generator=g)
    out = PagedLayer(TorchAttention(), kv, 0, batch).attend(q, full_k[c:], full_v[c:], None)
    bt = torch.tensor(table)
    ref = _ref(q, gather_kv_ref(kv.k[0], bt, c + 1, ks), gather_kv_ref(kv.v[0], bt, c + 1, vs), None)
    assert (out - ref).abs().max() <= TOL[storage]
