"""Fused RMSNorm (+ residual), SiLU-gate multiply and rotary embedding under TRITON_INTERPRET=1.

Oracles are the kernels/ref.py functions run in float64; each kernel's error may be at most
tolerances.FACTOR times the error of the same reference run by PyTorch in the inputs' precision
(which is how runtime/model.py computes these ops), plus a floor of a few ulps (which also covers
the interpreter's fp32->bf16 cast, which truncates instead of rounding). Shapes straddle the kernels' tiles (129 columns, 5 heads in an 8-head tile).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import triton
from tolerances import assert_within_baseline

from infq.kernels.ref import rms_norm_ref, rotary_ref, silu_mul_ref


def _interpreted(name: str):
    """Import `name` with its kernels built for the interpreter (see conftest.py)."""
    os.environ["TRITON_INTERPRET"] = "1"
    mod = importlib.import_module(name)
    built = not isinstance(mod._rms_norm_kernel, triton.runtime.JITFunction)
    return mod if built else importlib.reload(mod)


pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: test_attention_gpu.py runs these compiled")
fused = _interpreted("infq.kernels.fused") if not torch.cuda.is_available() else None
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
_assert_within = assert_within_baseline  # (out, float64 oracle, same-precision PyTorch result)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [129, 512])
def test_rms_norm(dtype, cols):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, cols, generator=g) * 4).to(dtype)  # (B, T, C)
    w = (1 + torch.randn(cols, generator=g) * 0.1).to(dtype)
    out = fused.rms_norm(x, w, 1e-5)
    _assert_within(out, rms_norm_ref(x.double(), w.double(), 1e-5), rms_norm_ref(x, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_residual(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 129, generator=g).to(dtype)
    r = (torch.randn(7, 129, generator=g) * 3).to(dtype)
    w = torch.randn(129, generator=g).to(dtype)
    out, h = fused.rms_norm(x, w, 1e-6, residual=r)
    ref_out, ref_h = rms_norm_ref(x, w, 1e-6, residual=r)
    # the sum is rounded to the dtype exactly as PyTorch's add does (bf16: up to the truncation)
    _assert_within(h, x.double() + r.double(), ref_h)
    oracle, _ = rms_norm_ref(h.double(), w.double(), 1e-6, residual=torch.zeros_like(h, dtype=torch.float64))
    _assert_within(out, oracle, rms_norm_ref(h, w, 1e-6))
    assert ref_out.shape == out.shape


def test_rms_norm_strided_rows_and_errors():
    big = torch.randn(6, 256).half()
    x = big[:, :128]  # rows strided by 256
    w = torch.ones(128, dtype=torch.float16)
    _assert_within(fused.rms_norm(x, w, 1e-6), rms_norm_ref(x.double(), w.double(), 1e-6), rms_norm_ref(x, w, 1e-6))
    with pytest.raises(ValueError, match="weight"):
        fused.rms_norm(x, torch.ones(64, dtype=torch.float16), 1e-6)
    with pytest.raises(ValueError, match="contiguous last"):
        fused.rms_norm(big.t(), torch.ones(6, dtype=torch.float16), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_on_halves_of_gate_up(dtype):
    g = torch.Generator().manual_seed(2)
    gate_up = (torch.randn(2, 9, 2 * 300, generator=g) * 3).to(dtype)  # (B, T, 2F) fused projection
    gate, up = gate_up[..., :300], gate_up[..., 300:]
    out = fused.silu_mul(gate, up)
    _assert_within(out, silu_mul_ref(gate.double(), up.double()), silu_mul_ref(gate, up))


def _tables(t: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (T, D) the way runtime.model.Rope builds them: both halves equal."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))  # (D/2,)
    ang = torch.arange(t).float()[:, None] * inv  # (T, D/2)
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
def test_rotary(dtype, d):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, 5, d, generator=g).to(dtype)  # (T, H, D): 5 heads in an 8-head tile
    cos, sin = _tables(11, d, dtype)
    out = fused.rotary_embedding(x, cos, sin)
    _assert_within(out, rotary_ref(x.double(), cos.double(), sin.double()), rotary_ref(x, cos, sin))


def test_rotary_with_rope_tables():
    """runtime.model.Rope's sin table has its first half negated (for `model.rotate`); the kernel
    reads its second half when told so, and matches `model.rotate` on the same tables."""
    from infq.runtime.arch import ModelConfig
    from infq.runtime.model import Rope, rotate

    cfg = ModelConfig.from_hf({"model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
                               "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "vocab_size": 64, "max_position_embeddings": 64})
    pos = torch.tensor([[0, 1, 5, 17, 63]])
    x = torch.randn(5, 6, 64, generator=torch.Generator().manual_seed(4)).half()  # (T, H, D)
    cos, sin = Rope(cfg)(pos, torch.float16)  # (1, T, D) each
    plain_sin = torch.cat([sin[0, :, 32:], sin[0, :, 32:]], -1)  # +sin in both halves
    oracle = rotary_ref(x.double(), cos[0].double(), plain_sin.double())
    out = fused.rotary_embedding(x, cos[0], sin[0], sin_first_half_negated=True)
    _assert_within(out, oracle, rotate(x, cos[0], sin[0]))


def test_rotary_strided_heads_and_errors():
    qkv = torch.randn(4, 6, 64).half()  # (T, Hq+Hk+Hv, D): rotate the k head in place of a copy
    k = qkv[:, 4:5]
    cos, sin = _tables(4, 64, torch.float16)
    _assert_within(fused.rotary_embedding(k, cos, sin), rotary_ref(k.double(), cos.double(), sin.double()),
                   rotary_ref(k, cos, sin))
    with pytest.raises(ValueError, match="cos/sin"):
        fused.rotary_embedding(k, cos[:3], sin[:3])
