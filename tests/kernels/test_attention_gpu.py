"""The attention and fused-op kernels compiled for a real GPU (skipped without CUDA).

The same checks as test_attention.py / test_fused.py at larger sizes: sequence lengths straddling
the Hopper tiles (127/128/129), long varlen batches, chunked prefill over a prefix, paged decode over
contexts of thousands of tokens with the flash-decoding split, int8/fp8 KV, and the autotuned public
ops. Oracles are float64 on the GPU; tolerances as in tests/tolerances.py. Run this file in its own
process on a GPU machine (TRITON_INTERPRET unset), e.g. `pytest tests/kernels/test_attention_gpu.py`.
"""

from __future__ import annotations

import os

import pytest
import torch
from tolerances import assert_within_baseline

from infq.kernels.ref import (
    KV_QMAX,
    attention_ref,
    flash_attention_varlen_ref,
    gather_kv_ref,
    rms_norm_ref,
    rotary_ref,
    sdpa_gqa,
    silu_mul_ref,
    write_kv_ref,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs CUDA and compiled Triton kernels")
if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    from infq.kernels import flash_attention as fa
    from infq.kernels import fused
    from infq.kernels import paged_attention as pa
DEV = "cuda"
HOPPER_CFG = (128, 64, 4, 3, False)  # one of the autotuned FlashAttention configs, fixed to keep compiles few
HOPPER_TMA = (128, 128, 8, 3, True)


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)


def _varlen(lq, lk, n_heads, n_kv, d, dtype, causal=True, config=HOPPER_CFG, public=False):
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(sum(lq), n_heads, d, device=DEV, generator=g).to(dtype)  # (total_q, H, D)
    k = torch.randn(sum(lk), n_kv, d, device=DEV, generator=g).to(dtype)  # (total_k, Hkv, D)
    v = torch.randn(sum(lk), n_kv, d, device=DEV, generator=g).to(dtype)
    cq, ck = _cu(lq), _cu(lk)
    if public:
        out = fa.flash_attention_varlen(q, k, v, cq, ck, max(lq), max(lk), causal)
    else:
        out = fa._launch(q, k, v, cq, ck, max(lq), causal, d ** -0.5, config)
    oracle = flash_attention_varlen_ref(q.double(), k.double(), v.double(), cq, ck, causal)
    base = torch.zeros_like(q)
    cqs, cks = cq.tolist(), ck.tolist()
    for b in range(len(lq)):
        if lq[b]:
            base[cqs[b]:cqs[b + 1]] = sdpa_gqa(q[cqs[b]:cqs[b + 1]], k[cks[b]:cks[b + 1]], v[cks[b]:cks[b + 1]],
                                               causal)
    assert_within_baseline(out, oracle, base)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (8, 2), (8, 1)])
def test_flash_varlen_compiled(dtype, d, n_heads, n_kv):
    lq = [127, 0, 1, 128, 129, 700]
    lk = [127, 0, 1, 300, 129, 1000]  # chunks after cached prefixes of 172 and 300 tokens
    _varlen(lq, lk, n_heads, n_kv, d, dtype)


def test_flash_non_causal_compiled():
    _varlen([65, 200], [300, 200], 4, 2, 128, torch.float16, causal=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_flash_tma_compiled(dtype, d):
    _varlen([127, 0, 1, 128, 129, 700], [127, 0, 1, 300, 129, 1000], 8, 2, d, dtype, config=HOPPER_TMA)
    _varlen([65, 200], [300, 200], 4, 1, d, dtype, causal=False, config=HOPPER_TMA)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_public_autotuned(dtype):
    _varlen([2048, 1000, 1], [2048, 1000, 1], 32, 8, 128, dtype, public=True)


def _paged(lens, n_kv, ratio, d, bs, cache, dtype, splits, public=False, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    need = [-(-n // bs) for n in lens]
    nb = sum(need) + 7
    perm = torch.randperm(nb, device=DEV, generator=g).tolist()
    tables = torch.full((len(lens), max(need) + 2), -1, dtype=torch.int32)
    slots = []
    for b, n in enumerate(lens):
        tables[b, :need[b]] = torch.tensor(perm[:need[b]], dtype=torch.int32)
        perm = perm[need[b]:]
        slots += [int(tables[b, t // bs]) * bs + t % bs for t in range(n)]
    tables = tables.to(DEV)
    kc = torch.zeros(nb, bs, n_kv, d, dtype=cache or dtype, device=DEV)
    vc = torch.zeros_like(kc)
    ks = vs = None
    if cache in KV_QMAX:
        ks, vs = torch.zeros(nb, bs, n_kv, device=DEV), torch.zeros(nb, bs, n_kv, device=DEV)
    k = torch.randn(len(slots), n_kv, d, device=DEV, generator=g).to(dtype)
    v = torch.randn(len(slots), n_kv, d, device=DEV, generator=g).to(dtype)
    pa.write_kv(k, v, kc, vc, torch.tensor(slots, device=DEV), ks, vs)
    q = torch.randn(len(lens), n_kv * ratio, d, device=DEV, generator=g).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    if public:
        out = pa.paged_attention(q, kc, vc, tables, seq_lens, k_scale=ks, v_scale=vs)
    else:
        out = pa._launch(q, kc, vc, tables, seq_lens, d ** -0.5, ks, vs, num_splits=splits, config=(64, 4, 3))
    oracle = torch.zeros(q.shape, dtype=torch.float64, device=DEV)
    base = torch.zeros_like(q)
    for b, n in enumerate(lens):
        if n:
            k64 = gather_kv_ref(kc, tables[b], n, ks, torch.float64)
            v64 = gather_kv_ref(vc, tables[b], n, vs, torch.float64)
            oracle[b] = attention_ref(q[b:b + 1].double(), k64, v64, causal=False)[0]
            base[b] = sdpa_gqa(q[b:b + 1], k64.to(dtype), v64.to(dtype), causal=False)[0]
    assert_within_baseline(out, oracle, base)


@pytest.mark.parametrize("cache", [None, torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("ratio,dtype", [(1, torch.float16), (8, torch.bfloat16)])
@pytest.mark.parametrize("splits", [1, 7])
def test_paged_compiled(cache, ratio, dtype, splits):
    _paged([1, 15, 16, 17, 0, 1000, 4097], 2, ratio, 128, 16, cache, dtype, splits)


@pytest.mark.parametrize("cache", [None, torch.int8])
def test_paged_public_autotuned(cache):
    _paged([8000, 3], 8, 4, 128, 16, cache, torch.bfloat16, None, public=True)  # batch 2: split over the context


@pytest.mark.parametrize("cache", [None, torch.int8, torch.float8_e4m3fn])
def test_write_kv_compiled_bit_exact(cache):
    g = torch.Generator(device=DEV).manual_seed(3)
    nb, bs, n_kv, d = 64, 16, 8, 128
    k = (torch.randn(300, n_kv, d, device=DEV, generator=g) * 5).to(torch.bfloat16)
    v = torch.randn(300, n_kv, d, device=DEV, generator=g).to(torch.bfloat16)
    slots = torch.randperm(nb * bs, device=DEV, generator=g)[:300]
    cdt = cache or torch.bfloat16
    caches = [torch.zeros(nb, bs, n_kv, d, dtype=cdt, device=DEV) for _ in range(4)]
    scales = [torch.zeros(nb, bs, n_kv, device=DEV) if cache else None for _ in range(4)]
    write_kv_ref(k, v, caches[0], caches[1], slots, scales[0], scales[1])
    pa.write_kv(k, v, caches[2], caches[3], slots, scales[2], scales[3])
    for a, b in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    if cache:
        assert torch.equal(scales[0], scales[2]) and torch.equal(scales[1], scales[3])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_compiled(dtype):
    g = torch.Generator(device=DEV).manual_seed(4)
    x = torch.randn(300, 4096, device=DEV, generator=g).to(dtype)
    r = torch.randn(300, 4096, device=DEV, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(4096, device=DEV, generator=g)).to(dtype)
    out, h = fused.rms_norm(x, w, 1e-5, residual=r)
    assert torch.equal(h, x + r)  # compiled, the sum rounds exactly as PyTorch's add
    assert_within_baseline(out, rms_norm_ref(h.double(), w.double(), 1e-5), rms_norm_ref(h, w, 1e-5))
    gate, up = x[:, :2000], r[:, 2000:4000]  # strided halves
    assert_within_baseline(fused.silu_mul(gate, up), silu_mul_ref(gate.double(), up.double()),
                           silu_mul_ref(gate, up))
    q = x[:, :32 * 128].view(300, 32, 128)
    ang = torch.arange(300, device=DEV)[:, None].float() * (1e4 ** (-torch.arange(0, 128, 2, device=DEV) / 128))
    cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
    assert_within_baseline(fused.rotary_embedding(q, cos, sin), rotary_ref(q.double(), cos.double(), sin.double()),
                           rotary_ref(q, cos, sin))
