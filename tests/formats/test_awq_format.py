"""AWQ GEMM format: reference §E.2 test vector, packing against an integer oracle, QuantizedTensor
round trips, refusals, configs, and an AutoAWQ-layout checkpoint built by plain Python loops
(tests/peer_layouts.py) that must load into the runtime with exactly the weights it encodes.
All comparisons are exact: packing is lossless and (q - z) * fp16 scale is exact in fp32."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch
from peer_layouts import AWQ_ORDER, autoawq_config, awq_linear, build_checkpoint
from tinymodels import make_tiny_model

from infq.errors import InfqError
from infq.formats.awq import (
    awq_quantization_config,
    awq_to_quantized_tensor,
    pack_awq,
    parse_awq_config,
    quantized_tensor_to_awq,
    unpack_awq,
)
from infq.formats.inspect import inspect_checkpoint
from infq.quantizers.rtn import quantize_rtn
from infq.quantizers.scheme import QuantConfig, QuantizedTensor, QuantScheme
from infq.runtime.loader import load_model


def u32(a: np.ndarray) -> list[int]:
    return [int(x) for x in np.asarray(a).view(np.uint32).ravel()]


def test_interleave_vector() -> None:
    packed = pack_awq(np.arange(8).reshape(1, 8))
    assert packed.dtype == np.int32 and packed.shape == (1, 1)
    assert u32(packed) == [0x75316420]
    assert unpack_awq(packed).tolist() == [list(range(8))]


def test_pack_matches_integer_oracle() -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 16, size=(5, 40), dtype=np.uint8)
    packed = pack_awq(values)
    assert packed.shape == (5, 5)
    for r in range(5):
        for c in range(5):
            word = sum(int(values[r, 8 * c + AWQ_ORDER[i]]) << (4 * i) for i in range(8))
            assert u32(packed[r, c]) == [word]
    assert np.array_equal(unpack_awq(packed), values)


def _qt(out: int, inp: int, gs: int, sym: bool, seed: int) -> QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if gs == -1 else inp // gs
    zeros = torch.full((out, n_groups), 8) if sym else torch.randint(0, 16, (out, n_groups), generator=g)
    return QuantizedTensor(
        codes=torch.randint(0, 16, (out, inp), generator=g).to(torch.uint8),
        scales=(torch.rand(out, n_groups, generator=g) + 0.01).half(),
        zeros=zeros.int(),
        g_idx=(torch.arange(inp) // (inp // n_groups)).int(),
        scheme=QuantScheme(4, gs, sym),
        shape=(out, inp),
    )


@pytest.mark.parametrize("gs", [32, 64, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_quantized_tensor_round_trip(gs: int, sym: bool) -> None:
    qt = _qt(48, 128, gs, sym, seed=gs + sym)
    bias = torch.randn(48)
    t = quantized_tensor_to_awq(qt, bias)
    n_groups = 1 if gs == -1 else 128 // gs
    assert t["qweight"].shape == (128, 6) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (n_groups, 6) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (n_groups, 48) and t["scales"].dtype == torch.float16
    assert t["bias"].dtype == torch.float16 and "g_idx" not in t
    back = awq_to_quantized_tensor(t, 4, gs, sym)
    for name in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, name), getattr(qt, name)), name
    assert back.scheme == qt.scheme and torch.equal(back.dequantize(), qt.dequantize())
    if sym:  # every stored zero is 8: every nibble of every qzeros word
        assert set(u32(t["qzeros"].numpy())) == {0x88888888}


def test_rtn_fake_quant_survives() -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    qt = quantize_rtn(w, QuantConfig(method="rtn", bits=4, group_size=32, sym=False))
    back = awq_to_quantized_tensor(quantized_tensor_to_awq(qt), 4, 32)
    assert torch.equal(back.dequantize(), qt.dequantize())


def test_refusals_name_the_reason() -> None:
    with pytest.raises(InfqError, match="output dim 12 is not a multiple of 8"):
        quantized_tensor_to_awq(_qt(12, 64, 32, True, 0))
    qt = _qt(16, 64, 32, False, 1)
    shuffled = QuantizedTensor(qt.codes, qt.scales, qt.zeros, qt.g_idx.flip(0).contiguous(), qt.scheme, qt.shape)
    with pytest.raises(InfqError, match="act-order g_idx"):
        quantized_tensor_to_awq(shuffled)
    three = quantize_rtn(torch.randn(16, 64), QuantConfig(method="rtn", bits=3, group_size=32))
    with pytest.raises(InfqError, match=r"AWQ GEMM format is 4-bit only; for 3 bits use --format gptq \(2, 3, 4, 8\)"):
        quantized_tensor_to_awq(three)
    zeros = qt.zeros.clone()
    zeros[0, 0] = 16  # a v1 GPTQ zero (stored 15, +1)
    with pytest.raises(InfqError, match="zero point of 16"):
        quantized_tensor_to_awq(QuantizedTensor(qt.codes, qt.scales, zeros, qt.g_idx, qt.scheme, qt.shape))
    t = quantized_tensor_to_awq(qt)
    with pytest.raises(InfqError, match="check group_size"):
        awq_to_quantized_tensor(dict(t, scales=t["scales"][:1]), 4, 32)
    with pytest.raises(InfqError, match="qzeros are missing"):
        awq_to_quantized_tensor({k: v for k, v in t.items() if k != "qzeros"}, 4, 32)


def test_config_contents_and_round_trip() -> None:
    c = QuantConfig(method="awq", bits=4, group_size=128, sym=False, nsamples=64, seqlen=512)
    d = awq_quantization_config(c)
    assert {"quant_method": "awq", "zero_point": True, "group_size": 128, "bits": 4, "version": "gemm",
            "modules_to_not_convert": None}.items() <= d.items()
    assert d["meta"]["quantizer"][0].startswith("infq:")
    assert parse_awq_config(d) == c
    skipped = QuantConfig(method="awq", group_size=64, skip=(r"model\.layers\.1\.mlp\.down_proj",))
    d = awq_quantization_config(skipped, ["model.layers.1.mlp.down_proj"])
    assert d["modules_to_not_convert"] == ["model.layers.1.mlp.down_proj"]
    back = parse_awq_config(d)
    assert back.is_skipped("model.layers.1.mlp.down_proj") and not back.is_skipped("model.layers.11.mlp.down_proj")
    with pytest.raises(ValueError, match="modules_to_not_convert"):
        awq_quantization_config(skipped)


def test_parse_autoawq_variants() -> None:
    c = parse_awq_config(autoawq_config(128))
    assert (c.method, c.bits, c.group_size, c.sym, c.skip) == ("awq", 4, 128, False, ())
    internal = {"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "zero_point": True, "version": "GEMM"}
    assert parse_awq_config(internal).group_size == 64
    transformers = {**autoawq_config(32), "backend": "autoawq", "do_fuse": False, "exllama_config": None}
    assert parse_awq_config(transformers).group_size == 32


@pytest.mark.parametrize(("change", "reason"), [
    ({"version": "gemv"}, "infq reads AWQ 'gemm' only"),
    ({"version": "exllama"}, "'exllama' stores another tensor layout"),
    ({"backend": "llm-awq"}, "llm-awq"),
    ({"zero_point": False}, "zero_point false"),
    ({"bits": 8}, "bits=8, which is not AWQ GEMM"),
    ({"quant_method": "gptq"}, "its own reader"),
    ({"group_size": None}, "lacks 'group_size'"),
])
def test_parse_refuses(change: dict, reason: str) -> None:
    with pytest.raises(InfqError) as e:
        parse_awq_config({**autoawq_config(128), **change})
    assert reason in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(("config", "reason"), [
    (QuantConfig(method="gptq", bits=8), "AWQ GEMM format is 4-bit only; for 8 bits use --format gptq (2, 3, 4, 8) or --format compressed-tensors (4, 8)"),
    (QuantConfig(method="gptq", lm_head=True), "lm_head"),
    (QuantConfig(method="gptq", desc_act=True), "act-order"),
])
def test_config_refuses(config: QuantConfig, reason: str) -> None:
    with pytest.raises(InfqError, match=re.escape(reason)):
        awq_quantization_config(config)


def test_static_groups_act_order_is_writable() -> None:
    assert awq_quantization_config(QuantConfig(method="gptq", desc_act=True, static_groups=True))["bits"] == 4


@pytest.mark.parametrize("family,gs", [("qwen2", 32), ("llama", 64)])
def test_autoawq_checkpoint_loads_exactly(tmp_path, family: str, gs: int) -> None:
    src = make_tiny_model(tmp_path / "src", family=family)
    rng = random.Random(gs)
    out = tmp_path / "awq"
    expected = build_checkpoint(src, out, lambda o, i: awq_linear(o, i, gs, rng), autoawq_config(gs))
    model = load_model(str(out), tokenizer=False).model
    for b in range(model.cfg.num_layers):
        for role, lin in model.blocks[b].linears.items():
            module = model.cfg.arch.linear_name(b, role)
            assert torch.equal(lin.weight, expected[module]), module
    if family == "qwen2":  # biases are plain tensors beside the packed ones, loaded as stored
        from safetensors.torch import load_file

        bias = load_file(str(src / "model.safetensors"))["model.layers.0.self_attn.q_proj.bias"]
        assert torch.equal(model.blocks[0].linears["q"].bias, bias)
    info = inspect_checkpoint(str(out))
    assert info["format"] == "awq" and info["quantization"]["version"] == "gemm"
    linears = [t for t in info["tensors"] if t["name"].endswith("_proj.weight")]
    assert len(linears) == 14 and {t["scheme"] for t in linears} == {f"awq int4 g{gs} asym"}
    assert not [t for t in info["tensors"] if t["name"].rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales")]
    q = next(t for t in linears if t["name"] == "model.layers.0.self_attn.q_proj.weight")
    assert q["shape"] == [64, 64] and q["params"] == 64 * 64
    n_groups = 64 // gs
    assert q["bytes"] == 64 * 64 // 2 + n_groups * (64 // 2 + 64 * 2)  # qweight + qzeros + fp16 scales
