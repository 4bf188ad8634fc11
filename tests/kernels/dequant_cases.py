"""Weights and the accuracy check shared by the interpreted and the GPU dequant-GEMM tests.

`make_*` build QuantizedTensors of every scheme from a seeded generator (on CPU); `check` runs one
dequant-GEMM launch on `device` and asserts it against a float64 oracle within tests/tolerances.py's
bound (relative to PyTorch's own same-precision product) and against `ref.dequant_gemm_ref`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tolerances import assert_within_baseline

from infq.kernels.ref import dequant_gemm_ref, dequant_gemm_torch
from infq.quantizers import kquants
from infq.quantizers.scheme import QuantizedTensor, QuantScheme


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


def check(dg, qt: QuantizedTensor, m: int, dtype=torch.float16, config=None, bias: bool = False,
          w_ref: torch.Tensor | None = None, device: str = "cpu") -> None:
    """Kernel (module `dg`, on `device`) vs float64 oracle within tolerances.py's bound, and vs
    ref.dequant_gemm_ref. config: a fixed GEMV config (no SPLIT_K key) or GEMM config, else tuned."""
    n, k = qt.shape
    g = torch.Generator().manual_seed(m * 7 + n)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    packed = dg.pack(qt).to(device)
    if config is None:
        out = dg.dequant_gemm(x, packed, b)
    else:
        run = dg.gemv if "SPLIT_K" not in config else dg.gemm
        out = run(x, packed, b, config=config)
    w = (qt.dequantize(torch.float32) if w_ref is None else w_ref).to(device)  # (N, K)
    oracle = x.double() @ w.double().T + (b.double() if bias else 0)  # (M, N) float64
    baseline = dequant_gemm_torch(x, qt, b)
    tensor_core = m > dg.GEMV_MAX_M or (config is not None and "SPLIT_K" in config)
    if dtype == torch.bfloat16 and tensor_core and device == "cpu":  # the interpreter truncates the bf16 weight tile
        trunc = F.linear(x.float(), _trunc_bf16(w), None if b is None else b.float()).to(dtype)
        if (trunc.double() - oracle).abs().max() > (baseline.double() - oracle).abs().max():
            baseline = trunc
    assert out.dtype == dtype and out.shape == (m, n)
    assert_within_baseline(out, oracle, baseline)
    assert_within_baseline(out, oracle, dequant_gemm_ref(x, qt, b))


