"""Triton dequant-GEMM (infq/kernels/dequant_gemm.py) under TRITON_INTERPRET=1, every scheme.

Shapes straddle the tiles the tests pin (GEMV BLOCK_N 16 / BLOCK_K 128; GEMM BLOCK_M 16, BLOCK_N
32, BLOCK_K 128): N of 127/128/129, per-channel K of 127/129, M of 1 (GEMV), 3 and 17 (tensor-core
kernel), split-K, bias, act-order g_idx, 2/3/4/5/6/8-bit codes, FP8 per-tensor and per-channel, and
GGML Q8_0/Q4_0/Q4_K/Q5_K/Q6_K blocks. Oracles: `ref.dequant_gemm_ref` (float32) and a float64
product of the reference decoding (GGUF: kquants' decoder, bit-identical to gguf-py's); the error
bound is tests/tolerances.py's, relative to PyTorch's same-precision matmul. An identity input reads
every decoded weight back, which must equal the reference decoder's fp16 rounding bit for bit.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_within_baseline

from infq.kernels.ref import dequant_gemm_ref, dequant_gemm_torch
from infq.quantizers import kquants
from infq.quantizers.scheme import QuantizedTensor, QuantScheme


def _interpreted(name: str):
    """Import `name` with its kernels built for the interpreter (see conftest.py)."""
    os.environ["TRITON_INTERPRET"] = "1"
    mod = importlib.import_module(name)
    return mod if mod._interpreting() else importlib.reload(mod)


pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: test_kernels_gpu.py runs these compiled")
dg = _interpreted("infq.kernels.dequant_gemm") if not torch.cuda.is_available() else None

GEMV_CFG = {"BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 4}
GEMM_CFG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 4}


def make_int(n: int, k: int, bits: int, gs: int, act_order: bool = False, sym: bool = False,
             seed: int = 0) -> QuantizedTensor:
    """Random codes/scales/zeros of an int scheme; act_order shuffles the channel -> group map."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if gs == -1 else k // gs
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=g) * 0.02 + 1e-3).half()
    if sym:
        zeros = torch.full((n, groups), 1 << (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(0, 1 << bits, (n, groups), generator=g, dtype=torch.int32)
    g_idx = (torch.arange(k) // (k // groups)).to(torch.int32)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    return QuantizedTensor(codes, scales, zeros, g_idx, QuantScheme(bits, gs, sym), (n, k))


def make_fp8(n: int, k: int, per_tensor: bool, scale_dtype=torch.float16) -> QuantizedTensor:
    g = torch.Generator().manual_seed(1)
    codes = (torch.randn(n, k, generator=g) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)
    scales = torch.full((n, 1), 3e-3) if per_tensor else torch.rand(n, 1, generator=g) * 1e-2 + 1e-4
    return QuantizedTensor(codes, scales.to(scale_dtype), None, torch.zeros(k, dtype=torch.int32),
                           QuantScheme(8, -1, True, "fp8"), (n, k))


def make_gguf(n: int, k: int, qtype: str) -> QuantizedTensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(2))
    return QuantizedTensor.from_gguf(kquants.quantize(w, qtype), qtype, (n, k))


def _trunc_bf16(w: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 by truncation, as Triton's interpreter casts."""
    return (w.float().contiguous().view(torch.int32) & -65536).view(torch.float32)


def check(qt: QuantizedTensor, m: int, dtype=torch.float16, config=None, bias: bool = False,
          w_ref: torch.Tensor | None = None) -> None:
    """Kernel vs float64 oracle within tolerances.py's bound, and vs ref.dequant_gemm_ref."""
    n, k = qt.shape
    g = torch.Generator().manual_seed(m * 7 + n)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    packed = dg.pack(qt)
    if config is None:
        out = dg.dequant_gemm(x, packed, b)
    else:
        run = dg.gemv if "SPLIT_K" not in config else dg.gemm
        out = run(x, packed, b, config=config)
    w = qt.dequantize(torch.float32) if w_ref is None else w_ref  # (N, K)
    oracle = x.double() @ w.double().T + (b.double() if bias else 0)  # (M, N) float64
    baseline = dequant_gemm_torch(x, qt, b)
    tensor_core = m > dg.GEMV_MAX_M or (config is not None and "SPLIT_K" in config)
    if dtype == torch.bfloat16 and tensor_core:  # the interpreter truncates the bf16 weight tile
        trunc = F.linear(x.float(), _trunc_bf16(w), None if b is None else b.float()).to(dtype)
        if (trunc.double() - oracle).abs().max() > (baseline.double() - oracle).abs().max():
            baseline = trunc
    assert out.dtype == dtype and out.shape == (m, n)
    assert_within_baseline(out, oracle, baseline)
    assert_within_baseline(out, oracle, dequant_gemm_ref(x, qt, b))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_int_bits(bits, m):
    check(make_int(40, 256, bits, 64, seed=bits), m)


@pytest.mark.parametrize("n", [127, 128, 129])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_int4_straddles_n(n, m):
    check(make_int(n, 256, 4, 128), m, config=GEMV_CFG if m == 1 else GEMM_CFG)


@pytest.mark.parametrize("k", [127, 129])
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("bits", [4, 8])
def test_per_channel_straddles_k(k, m, bits):
    check(make_int(33, k, bits, -1, sym=True), m)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_act_order(bits, m):
    qt = make_int(48, 512, bits, 128, act_order=True)
    assert dg.pack(qt).perm is not None
    check(qt, m)


@pytest.mark.parametrize("gs", [16, 32, 256])
@pytest.mark.parametrize("m", [1, 5])
def test_group_sizes_and_sym(gs, m):
    qt = make_int(24, 512, 4, gs, sym=True)
    assert dg.pack(qt).offset_mode == 0  # one zero point for the whole weight: not stored
    check(qt, m)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 17])
def test_bf16_and_bias(dtype, m):
    check(make_int(65, 256, 4, 32), m, dtype=dtype, bias=True)


@pytest.mark.parametrize("split", [2, 3])
def test_split_k(split):
    cfg = dict(GEMM_CFG, SPLIT_K=split, BLOCK_K=64)
    check(make_int(70, 512, 4, 64), 3, config=cfg, bias=True)
    check(make_int(70, 512, 4, 64), 1, config=cfg)


@pytest.mark.parametrize("per_tensor", [True, False])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_fp8(per_tensor, m):
    check(make_fp8(129, 192, per_tensor), m)


def test_fp8_bf16_scales_and_subnormals():
    qt = make_fp8(16, 64, False, torch.bfloat16)
    # every e4m3 byte (NaN excluded) must decode exactly
    codes = torch.arange(256, dtype=torch.uint8)[:-1].view(torch.float8_e4m3fn)
    codes = codes[~torch.isnan(codes.float())]
    qt = QuantizedTensor(codes.repeat(2, 1).contiguous(), torch.ones(2, 1, dtype=torch.float16), None,
                         torch.zeros(codes.numel(), dtype=torch.int32), QuantScheme(8, -1, True, "fp8"),
                         (2, codes.numel()))
    eye = torch.eye(codes.numel(), dtype=torch.float16)
    out = dg.gemm(eye, dg.pack(qt), config=dict(GEMM_CFG, BLOCK_N=16))  # (K, 2) = Wᵀ
    assert torch.equal(out.T, qt.dequantize(torch.float16))
    check(make_fp8(16, 64, False, torch.bfloat16), 1, dtype=torch.bfloat16)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_gguf(qtype, m):
    qt = make_gguf(33, 512, qtype)
    blocks = qt.codes.numpy()
    w = kquants.dequantize(blocks, qtype, 512)  # independent decoder, bit-identical to gguf-py
    check(qt, m, w_ref=w)


@pytest.mark.parametrize("qt", [make_int(20, 256, 3, 64), make_int(20, 256, 6, 32, act_order=True),
                                make_gguf(20, 256, "Q4_K"), make_gguf(20, 256, "Q6_K"),
                                make_gguf(20, 256, "Q8_0")], ids=["int3", "int6-act", "Q4_K", "Q6_K", "Q8_0"])
def test_decoded_weights_bit_exact(qt):
    """x = I reads every weight the kernel decodes: equal to the reference decoder rounded to fp16."""
    k = qt.shape[1]
    eye = torch.eye(k, dtype=torch.float16)
    out = dg.gemm(eye, dg.pack(qt), config=GEMM_CFG)  # (K, N) = Wᵀ
    assert torch.equal(out.T, qt.dequantize(torch.float32).to(torch.float16))


def test_leading_dims_and_empty():
    qt = make_int(40, 128, 4, 32)
    p = dg.pack(qt)
    x = torch.randn(2, 3, 128).half()
    out = dg.dequant_gemm(x, p)
    assert out.shape == (2, 3, 40)
    assert torch.equal(out, dg.dequant_gemm(x.reshape(6, 128), p).reshape(2, 3, 40))
    assert dg.dequant_gemm(x[:0], p).shape == (0, 3, 40)


def test_checks_and_unsupported():
    qt = make_int(16, 96, 4, 48)  # 48 is a multiple of 16: fine
    assert dg.supported(qt)
    bad = make_int(16, 120, 4, 24)  # 24 is not a multiple of 16
    assert not dg.supported(bad)
    with pytest.raises(ValueError, match="multiple of 16"):
        dg.pack(bad)
    assert not dg.supported(make_int(16, 64, 7, 32))  # 7-bit codes have no plane split
    assert not dg.supported(make_gguf(4, 256, "Q3_K"))
    p = dg.pack(make_int(16, 64, 4, 32))
    with pytest.raises(ValueError, match="input features"):
        dg.dequant_gemm(torch.randn(1, 65).half(), p)
    with pytest.raises(ValueError, match="fp16/bf16"):
        dg.dequant_gemm(torch.randn(1, 64), p)
    with pytest.raises(ValueError, match="bias"):
        dg.dequant_gemm(torch.randn(1, 64).half(), p, torch.zeros(3).half())


def test_pack_layout_and_bytes():
    qt = make_int(8, 96, 3, 32)
    p = dg.pack(qt)
    assert (p.bits_lo, p.bits_hi) == (2, 1)
    assert p.lo.shape == (8, 96 * 2 // 32) and p.hi.shape == (8, 96 // 32)
    lo = torch.stack([(p.lo >> (2 * i)) & 3 for i in range(16)], -1).reshape(8, 96)
    hi = torch.stack([(p.hi >> i) & 1 for i in range(32)], -1).reshape(8, 96)
    assert torch.equal((lo | hi << 2).to(torch.uint8), qt.codes)
    assert p.nbytes == 8 * 96 * 3 // 8 + qt.scales.numel() * 2 + qt.zeros.numel() * 2
    assert p.to("cpu").lo.data_ptr() == p.lo.data_ptr()
