"""The dequant-GEMM checks of test_dequant_gemm.py compiled for real on a CUDA GPU, at larger shapes.

Skipped without CUDA. Shapes still straddle tiles (N = 1000/513, per-channel K = 1031, M = 1, 5,
16, 17, 33, 300); the autotuned path runs for int4 g128 over the M buckets (fp16 and bf16), fixed
configs (both decoders) for every other scheme, split-K, and the identity read-back of decoded
weights. Same oracles and tolerances as the interpreted tests (tests/tolerances.py).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

if torch.cuda.is_available():
    from kernels.dequant_cases import check as _check
    from kernels.dequant_cases import make_fp8, make_gguf, make_int

    os.environ.pop("TRITON_INTERPRET", None)  # an interpreted test module may have set it
    dg = importlib.import_module("infq.kernels.dequant_gemm")
    dg = importlib.reload(dg) if dg._interpreting() else dg

    def check(*args, **kwargs):
        _check(dg, *args, device="cuda", **kwargs)

    CASES = {
        "int2-g64": lambda: make_int(1000, 1024, 2, 64), "int3-act": lambda: make_int(513, 1024, 3, 128, act_order=True),
        "int4-act": lambda: make_int(513, 1024, 4, 128, act_order=True),
        "int5-g32": lambda: make_int(513, 1024, 5, 32), "int6-g16-sym": lambda: make_int(513, 1024, 6, 16, sym=True),
        "int8-k1031": lambda: make_int(513, 1031, 8, -1, sym=True), "int4-k1031": lambda: make_int(300, 1031, 4, -1),
        "fp8-tensor": lambda: make_fp8(1000, 1024, True), "fp8-channel": lambda: make_fp8(513, 1024, False),
        "Q8_0": lambda: make_gguf(513, 1024, "Q8_0"), "Q4_0": lambda: make_gguf(513, 1024, "Q4_0"),
        "Q4_K": lambda: make_gguf(513, 1024, "Q4_K"), "Q5_K": lambda: make_gguf(513, 1024, "Q5_K"),
        "Q6_K": lambda: make_gguf(513, 1024, "Q6_K"),
    }
else:
    CASES = {}

GEMV_CFG = {"BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 4}
GEMM_CFG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 1, "FLAT": False, "num_warps": 4}


@pytest.mark.parametrize("m", [1, 5, 16, 33, 300])
def test_tuned_int4_g128(m):
    check(make_int(1000, 2048, 4, 128), m, bias=True)


@pytest.mark.parametrize("m", [1, 33])
def test_tuned_int4_bf16(m):
    check(make_int(1000, 2048, 4, 128), m, dtype=torch.bfloat16)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("flat", [False, True])
def test_schemes_fixed_configs(case, flat):
    qt = CASES[case]()
    if not flat:
        check(qt, 1, config=GEMV_CFG)
    check(qt, 17, config=dict(GEMM_CFG, FLAT=flat, BLOCK_K=128 if not flat else 64))


def test_split_k_and_bias():
    check(make_int(1000, 2048, 4, 128), 3, config=dict(GEMM_CFG, SPLIT_K=4), bias=True)


@pytest.mark.parametrize("case", ["int3-act", "Q4_K", "Q6_K", "fp8-channel"])
def test_decoded_weights_bit_exact(case):
    qt = CASES[case]()
    k = qt.shape[1]
    eye = torch.eye(k, dtype=torch.float16, device="cuda")
    out = dg.gemm(eye, dg.pack(qt).to("cuda"), config=GEMM_CFG)  # (K, N) = Wᵀ
    assert torch.equal(out.T.cpu(), qt.dequantize(torch.float32).to(torch.float16))
