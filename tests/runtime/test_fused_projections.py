"""Serving fuses q/k/v and gate/up into one linear each (`DecoderModel.fuse_projections`): the logits
must be those of the separate linears.

Oracle: the same checkpoint loaded without fusing, same dtype and kernels. Tolerances: dense fp32
1e-5 relative to the logits' scale (a longer N may block the GEMM differently); the packed
int4/int8 kernels compute each output column on its own, so their fused logits are bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from tinymodels import make_tiny_model

from infq.runtime.engine import Engine, EngineConfig
from infq.runtime.loader import load_model
from infq.runtime.sampling import SamplingParams

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]])


def _groups(model) -> set[str]:
    return {g for b in model.blocks for g in b.fused}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_dense_fused_logits_match(tmp_path, family):
    path = make_tiny_model(tmp_path / family, family=family)
    plain = load_model(str(path)).model
    fused = load_model(str(path), serving=True).model
    assert _groups(plain) == set() and _groups(fused) == {"qkv", "gate_up"}
    assert not any(r in b.linears for b in fused.blocks for r in ("q", "k", "v", "gate", "up"))
    a, b = plain(IDS), fused(IDS)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_fused_logits_identical(tmp_path, bits):
    from infq.quantizers.api import QuantizeRequest, quantize_model

    # q/k/v biases ride along; 2 KV heads of 32: k and v end on the int4 layout's 64-row blocks
    src = make_tiny_model(tmp_path / "src", family="qwen2", hidden_size=128, intermediate_size=256)
    out = tmp_path / "q"
    quantize_model(QuantizeRequest(model=str(src), method="rtn", bits=bits, group_size=32 if bits == 4 else -1,
                                   out=str(out)))
    plain = load_model(str(out), dtype="bfloat16").model
    fused = load_model(str(out), serving=True).model  # auto: bfloat16 for integer codes on a CPU
    assert fused.dtype == torch.bfloat16 and _groups(fused) == {"qkv", "gate_up"}
    kernel = {"qkv": fused.blocks[0].fused["qkv"].impl}
    assert kernel["qkv"] == ("int4pack" if bits == 4 else "int8pack")
    assert torch.equal(plain(IDS), fused(IDS))
    params = SamplingParams(temperature=0.0)
    outs = [Engine(m, EngineConfig()).generate([IDS[0].tolist()], params, 12, ignore_eos=True)[0].token_ids
            for m in (plain, fused)]
    assert outs[0] == outs[1]


def _int4(n: int, perm=None):
    from infq.kernels import dispatch

    k = dispatch.Int4PackKernel.__new__(dispatch.Int4PackKernel)
    k.group, k.planes, k.dtype, k.perm, k.n = 32, 1, torch.bfloat16, perm, n
    k.packed = torch.zeros(n, 32, dtype=torch.uint8)
    k.sz, k._op, k.nbytes = torch.zeros(1, n, 2, dtype=torch.bfloat16), None, 0
    return k


def test_unfusable_int4_kernels_stay_separate():
    """An act-order kernel permutes x per linear; the packed layout interleaves rows in blocks of
    64, so a part of 32 rows before another cannot be concatenated."""
    from infq.kernels import dispatch

    assert dispatch.fuse_kernels([_int4(64, torch.arange(64)), _int4(64)]) is None
    assert dispatch.fuse_kernels([_int4(32), _int4(64)]) is None
    assert dispatch.fuse_kernels([_int4(64), _int4(32)]) is not None


def test_fused_int4_matches_separate_kernels():
    """Parts of 64 and 48 rows against the aten kernel run on each part (bit-identical)."""
    from infq.kernels import dispatch
    from infq.quantizers.scheme import QuantizedTensor, QuantScheme

    g = torch.Generator().manual_seed(0)
    kernels = []
    for n in (64, 128, 48):
        codes = torch.randint(0, 16, (n, 128), generator=g, dtype=torch.uint8)
        scales = torch.rand(n, 4, generator=g) * 0.1 + 0.01
        zeros = torch.full((n, 4), 8, dtype=torch.int32)
        g_idx = torch.arange(128, dtype=torch.int32) // 32
        qt = QuantizedTensor(codes, scales, zeros, g_idx, QuantScheme(4, 32, True), (n, 128))
        kernels.append(dispatch.prepare(qt, torch.device("cpu"), torch.bfloat16))
    fused = dispatch.fuse_kernels(kernels)
    x = torch.randn(3, 128, generator=g, dtype=torch.bfloat16)
    assert torch.equal(fused(x), torch.cat([k(x) for k in kernels], -1))
