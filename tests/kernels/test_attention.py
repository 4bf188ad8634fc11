"""FlashAttention varlen prefill, paged decode attention and write_kv under TRITON_INTERPRET=1.

Each kernel runs on CPU through Triton's interpreter at small shapes that straddle its tiles (the
interpreter uses 16-wide tiles: lengths 15/16/17; a 64-row run covers 63/64/65), GQA ratios 1/4/8,
head dims 64 and 128, varlen batches with empty and 1-token sequences, chunked prefill (keys longer
than queries), block tables with holes and -1 padding, int8 and fp8 KV. The oracle is float64;
the kernel's error may be at most tolerances.FACTOR times PyTorch's own error doing the same
attention in the same precision (SDPA on the same fp16/bf16 inputs), plus a floor of a few ulps
(which also covers the interpreter's fp32->bf16 cast, which truncates instead of rounding).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from tolerances import assert_within_baseline

from infq.kernels.ref import (
    KV_QMAX,
    attention_ref,
    flash_attention_varlen_ref,
    gather_kv_ref,
    sdpa_gqa,
    write_kv_ref,
)


def _interpreted(name: str):
    """Import `name` with its kernels built for the interpreter (see conftest.py)."""
    os.environ["TRITON_INTERPRET"] = "1"
    mod = importlib.import_module(name)
    return mod if mod._interpreting() else importlib.reload(mod)


pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: test_attention_gpu.py runs these compiled")
fa = _interpreted("infq.kernels.flash_attention") if not torch.cuda.is_available() else None
pa = _interpreted("infq.kernels.paged_attention") if not torch.cuda.is_available() else None
_assert_within = assert_within_baseline  # (out, float64 oracle, same-precision PyTorch result)


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def _varlen_case(lq: list[int], lk: list[int], n_heads: int, n_kv: int, d: int, dtype: torch.dtype,
                 causal: bool = True, config=None, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), n_heads, d, generator=g).to(dtype)  # (total_q, H, D)
    k = torch.randn(sum(lk), n_kv, d, generator=g).to(dtype)  # (total_k, Hkv, D)
    v = torch.randn(sum(lk), n_kv, d, generator=g).to(dtype)
    cq, ck = _cu(lq), _cu(lk)
    out = fa._launch(q, k, v, cq, ck, max(lq), causal, d ** -0.5, config)
    oracle = flash_attention_varlen_ref(q.double(), k.double(), v.double(), cq, ck, causal)
    base = torch.zeros_like(q)
    for b in range(len(lq)):
        if lq[b]:
            base[cq[b]:cq[b + 1]] = sdpa_gqa(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], causal)
    assert out.shape == q.shape and out.dtype == dtype
    _assert_within(out, oracle, base)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n_heads,n_kv", [(2, 2), (4, 1), (8, 1)])
def test_flash_varlen_matches_reference(dtype, d, n_heads, n_kv):
    lq = [15, 0, 1, 16, 17]  # straddles the interpreter's 16-row tiles; an empty and a 1-token sequence
    lk = [15, 0, 1, 33, 17]  # sequence 3 is a chunk after a 17-token cached prefix
    _varlen_case(lq, lk, n_heads, n_kv, d, dtype)


@pytest.mark.parametrize("tma", [False, True])
def test_flash_hopper_tiles_straddle_64(tma):
    # a Hopper tile shape through the interpreter; whole key tiles by pointers or by TMA descriptors
    _varlen_case([63, 64, 65], [63, 100, 65], 2, 1, 64, torch.float16, config=(64, 32, 4, 1, tma))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_tma_varlen_gqa(dtype):
    _varlen_case([15, 0, 1, 16, 17], [15, 0, 1, 33, 40], 8, 2, 128, dtype, config=(16, 16, 4, 1, True))


def test_flash_non_causal_and_prefix():
    _varlen_case([5, 17], [40, 17], 4, 2, 64, torch.float16, causal=False)


def test_flash_public_op_strided_input_and_scale():
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(20, 6, 64, generator=g).half()  # a fused projection: 4 q heads, 1 k, 1 v
    q, k, v = qkv[:, :4], qkv[:, 4:5], qkv[:, 5:6]
    cu = _cu([20])
    out = fa.flash_attention_varlen(q, k, v, cu, cu, 20, 20, scale=0.3)
    oracle = attention_ref(q.double(), k.double(), v.double(), True, 0.3)
    _assert_within(out, oracle, sdpa_gqa(q, k, v, True, 0.3))


def test_flash_rejects_bad_inputs():
    q = torch.randn(4, 4, 64).half()
    k = torch.randn(4, 3, 64).half()
    cu = _cu([4])
    with pytest.raises(ValueError, match="multiple of kv heads"):
        fa.flash_attention_varlen(q, k, k, cu, cu, 4, 4)
    with pytest.raises(ValueError, match="int32"):
        fa.flash_attention_varlen(q, q, q, cu.long(), cu, 4, 4)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        fa.flash_attention_varlen(q.float(), q.float(), q.float(), cu, cu, 4, 4)


def _paged_cache(lens: list[int], n_kv: int, d: int, bs: int, cache_dtype, dtype, seed: int = 0):
    """A shuffled block pool with holes: each sequence's blocks are scattered, tables padded with -1."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lens]
    nb = sum(need) + 5  # spare blocks stay unused
    width = max(need + [1]) + 1
    perm = torch.randperm(nb, generator=g).tolist()
    tables = torch.full((len(lens), width), -1, dtype=torch.int32)
    slots = []
    for b, n in enumerate(lens):
        tables[b, :need[b]] = torch.tensor(perm[:need[b]], dtype=torch.int32)
        perm = perm[need[b]:]
        slots += [int(tables[b, t // bs]) * bs + t % bs for t in range(n)]
    kc = torch.zeros(nb, bs, n_kv, d, dtype=cache_dtype)
    vc = torch.zeros_like(kc)
    ks = vs = None
    if cache_dtype in KV_QMAX:
        ks, vs = torch.zeros(nb, bs, n_kv), torch.zeros(nb, bs, n_kv)
    k = torch.randn(len(slots), n_kv, d, generator=g).to(dtype)  # (T, Hkv, D)
    v = torch.randn(len(slots), n_kv, d, generator=g).to(dtype)
    write_kv_ref(k, v, kc, vc, torch.tensor(slots, dtype=torch.int64), ks, vs)
    return kc, vc, ks, vs, tables


def _paged_oracle_and_baseline(q, kc, vc, ks, vs, tables, lens):
    oracle = torch.zeros(q.shape, dtype=torch.float64)
    base = torch.zeros_like(q)
    for b, n in enumerate(lens):
        if n == 0:
            continue
        k64 = gather_kv_ref(kc, tables[b], n, ks, torch.float64)  # the dequantized cache is the input
        v64 = gather_kv_ref(vc, tables[b], n, vs, torch.float64)
        oracle[b] = attention_ref(q[b:b + 1].double(), k64, v64, causal=False)[0]
        base[b] = sdpa_gqa(q[b:b + 1], k64.to(q.dtype), v64.to(q.dtype), causal=False)[0]
    return oracle, base


@pytest.mark.parametrize("cache", [None, torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("ratio", [1, 8])  # ratio 4: test_paged_block_size_8_public_op
@pytest.mark.parametrize("dtype,d", [(torch.float16, 64), (torch.bfloat16, 128)])
def test_paged_attention_matches_reference(cache, ratio, dtype, d):
    lens = [17, 1, 16, 0, 40]  # straddles 16-token blocks and tiles; an empty slot in the batch
    n_kv = 2
    kc, vc, ks, vs, tables = _paged_cache(lens, n_kv, d, 16, cache or dtype, dtype)
    q = torch.randn(len(lens), n_kv * ratio, d, generator=torch.Generator().manual_seed(3)).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    oracle, base = _paged_oracle_and_baseline(q, kc, vc, ks, vs, tables, lens)
    for splits in (1, 3):  # direct, and flash-decoding partials merged by the second kernel
        out = pa._launch(q, kc, vc, tables, seq_lens, d ** -0.5, ks, vs, num_splits=splits)
        _assert_within(out, oracle, base)
        assert out[3].abs().max() == 0  # a sequence of length 0 gets zeros, as in the reference


def test_paged_block_size_8_public_op():
    lens = [7, 8, 9, 30]
    kc, vc, ks, vs, tables = _paged_cache(lens, 2, 64, 8, torch.int8, torch.float16, seed=5)  # GQA 4
    q = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(4)).half()
    out = pa.paged_attention(q, kc, vc, tables, torch.tensor(lens, dtype=torch.int32), k_scale=ks, v_scale=vs)
    _assert_within(out, *_paged_oracle_and_baseline(q, kc, vc, ks, vs, tables, lens))


def test_paged_rejects_bad_inputs():
    kc = torch.zeros(4, 16, 2, 64, dtype=torch.int8)
    q = torch.zeros(1, 4, 64, dtype=torch.float16)
    bt, sl = torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="k_scale"):
        pa.paged_attention(q, kc, kc, bt, sl)
    with pytest.raises(ValueError, match="int32"):
        pa.paged_attention(q, kc.half(), kc.half(), bt.long(), sl)


@pytest.mark.parametrize("cache", [None, torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_write_kv_matches_reference(cache, dtype):
    nb, bs, n_kv, d = 6, 16, 2, 64
    g = torch.Generator().manual_seed(7)
    k = (torch.randn(9, n_kv, d, generator=g) * 3).to(dtype)
    v = torch.randn(9, n_kv, d, generator=g).to(dtype)
    k[2, 1] = 0  # an all-zero row gets scale 1
    k[3, 0, :8] = torch.tensor([-1e-6, 1e-6, -0.0, 0.0, -3e-4, 3e-4, -2e-3, 2e-3])  # to +-0 and fp8 subnormals
    slots = torch.tensor([5, 17, 18, 40, 95, 0, 64, 33, 63], dtype=torch.int64)
    cdt = cache or dtype
    caches = [torch.zeros(nb, bs, n_kv, d, dtype=cdt) for _ in range(4)]
    scales = [torch.zeros(nb, bs, n_kv) if cache else None for _ in range(4)]
    write_kv_ref(k, v, caches[0], caches[1], slots, scales[0], scales[1])
    pa.write_kv(k, v, caches[2], caches[3], slots, scales[2], scales[3])
    for a, b in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(a.view(torch.uint8) if cache else a, b.view(torch.uint8) if cache else b)
    if cache:
        assert torch.equal(scales[0], scales[2]) and torch.equal(scales[1], scales[3])


def test_write_kv_skips_padding_slots():
    kc = torch.zeros(2, 16, 1, 64, dtype=torch.float16)
    vc = torch.zeros_like(kc)
    k = torch.ones(3, 1, 64, dtype=torch.float16)
    pa.write_kv(k, 2 * k, kc, vc, torch.tensor([3, -1, 20]))
    assert kc.view(32, 64)[[3, 20]].eq(1).all() and vc.view(32, 64)[[3, 20]].eq(2).all()
    assert kc.abs().sum() == 2 * 64  # nothing else written (the -1 row went nowhere)
