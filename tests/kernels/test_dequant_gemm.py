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
from kernels.dequant_cases import check as _check
from kernels.dequant_cases import make_fp8, make_gguf, make_int

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
GEMM_CFG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 1, "FLAT": False, "num_warps": 4}


def check(*args, **kwargs):
    _check(dg, *args, **kwargs)


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
    check(make_int(20, 96, bits, 32, act_order=True), m)  # K not a multiple of BLOCK_K: masked


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


FLAT_CASES = {
    "int4-n129": lambda: make_int(129, 256, 4, 128), "int3-act": lambda: make_int(48, 512, 3, 128, act_order=True),
    "int8-k129": lambda: make_int(33, 129, 8, -1), "int6-g16-sym": lambda: make_int(40, 256, 6, 16, sym=True),
    "fp8": lambda: make_fp8(40, 160, False), "Q4_K": lambda: make_gguf(33, 512, "Q4_K"),
    "Q5_K": lambda: make_gguf(17, 256, "Q5_K"), "Q6_K": lambda: make_gguf(33, 512, "Q6_K"),
    "Q8_0": lambda: make_gguf(33, 256, "Q8_0"),
}


@pytest.mark.parametrize("case", list(FLAT_CASES))
@pytest.mark.parametrize("m", [1, 17])
def test_flat_decoder(case, m):
    """The element-wise decoder (the autotuner's FLAT configs) on every kind of scheme."""
    qt = FLAT_CASES[case]()
    check(qt, m, config=dict(GEMM_CFG, FLAT=True, BLOCK_K=64))  # M = 1 too: the tensor-core kernel


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


def test_every_tuned_gemv_config():
    """Each config the GPU autotuner may pick for the GEMV, on a K (640) that no long tile divides
    (the masked K tail) and an N that straddles BLOCK_N."""
    for c in dg._GEMV_CONFIGS:
        check(make_int(19, 640, 4, 128), 1, config={**c.kwargs, "num_warps": c.num_warps})
