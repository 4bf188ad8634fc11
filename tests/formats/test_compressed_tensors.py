"""compressed-tensors pack-quantized: reference §E.3 test vector, packing against an integer oracle,
QuantizedTensor round trips, refusals, configs (llm-compressor presets in, FP4 / W8A8 refused; FP8 in
test_fp8_format.py), and
llm-compressor-layout checkpoints built by plain Python loops (tests/peer_layouts.py) that must load
into the runtime with exactly the weights they encode. All comparisons are exact."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from peer_layouts import build_checkpoint, ct_linear, llmcompressor_config
from tinymodels import make_tiny_model

from infq.errors import InfqError
from infq.formats.compressed_tensors import (
    ct_quantization_config,
    ct_to_quantized_tensor,
    pack_ct,
    parse_ct_config,
    quantized_tensor_to_ct,
    unpack_ct,
)
from infq.formats.inspect import inspect_checkpoint
from infq.quantizers.rtn import quantize_rtn
from infq.quantizers.scheme import QuantConfig, QuantizedTensor, QuantScheme
from infq.runtime.loader import load_model


def u32(a: np.ndarray) -> list[int]:
    return [int(x) for x in np.asarray(a).view(np.uint32).ravel()]


def test_signed_code_vector() -> None:
    signed = np.arange(-8, 0).reshape(1, 8)  # -8..-1 in input columns 0..7
    packed = pack_ct(signed + 8, 4)
    assert packed.dtype == np.int32 and u32(packed) == [0x76543210]
    assert (unpack_ct(packed, 4, 8).astype(int) - 8).tolist() == signed.tolist()
    assert u32(pack_ct(np.array([[-128, -1, 0, 127]]) + 128, 8)) == [0xFF807F00]


def test_padding_and_oracle() -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 16, size=(3, 13), dtype=np.uint8)  # 13 columns -> 2 words, 3 nibbles padding
    packed = pack_ct(values, 4)
    assert packed.shape == (3, 2)
    for r in range(3):
        words = [sum(int(v) << (4 * j) for j, v in enumerate(values[r, 8 * k:8 * k + 8])) for k in range(2)]
        assert u32(packed[r]) == words
    assert np.array_equal(unpack_ct(packed, 4, 13), values)
    with pytest.raises(InfqError, match="cannot hold"):
        unpack_ct(packed, 4, 17)


def _qt(out: int, inp: int, bits: int, gs: int, sym: bool, act_order: bool, seed: int) -> QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    n_groups, half = (1 if gs == -1 else inp // gs), 1 << (bits - 1)
    zeros = (torch.full((out, n_groups), half) if sym
             else torch.randint(0, 2 * half, (out, n_groups), generator=g))
    g_idx = torch.arange(inp) // (inp // n_groups)
    if act_order:
        g_idx = g_idx[torch.randperm(inp, generator=g)]
    return QuantizedTensor(
        codes=torch.randint(0, 2 * half, (out, inp), generator=g).to(torch.uint8),
        scales=(torch.rand(out, n_groups, generator=g) + 0.01).half(),
        zeros=zeros.int(), g_idx=g_idx.int(), scheme=QuantScheme(bits, gs, sym), shape=(out, inp),
    )


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [32, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_quantized_tensor_round_trip(bits: int, gs: int, sym: bool) -> None:
    out, inp = 20, 96  # out not a multiple of the pack factor: zero points get padded along dim 0
    qt = _qt(out, inp, bits, gs, sym, act_order=False, seed=bits + gs + sym)
    t = quantized_tensor_to_ct(qt)
    n_groups, pf = (1 if gs == -1 else inp // gs), 32 // bits
    assert t["weight_packed"].shape == (out, inp // pf) and t["weight_packed"].dtype == torch.int32
    assert t["weight_scale"].shape == (out, n_groups) and t["weight_scale"].dtype == torch.float16
    assert t["weight_shape"].tolist() == [out, inp] and t["weight_shape"].dtype == torch.int32
    assert ("weight_zero_point" in t) == (not sym) and "weight_g_idx" not in t
    if not sym:
        assert t["weight_zero_point"].shape == (-(-out // pf), n_groups)
        assert t["weight_zero_point"].dtype == torch.int32
    back = ct_to_quantized_tensor(t, bits, gs, sym)
    for name in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, name), getattr(qt, name)), name
    assert back.scheme == qt.scheme and torch.equal(back.dequantize(), qt.dequantize())


def test_act_order_and_bias() -> None:
    qt = _qt(16, 64, 4, 16, False, act_order=True, seed=3)
    with pytest.raises(InfqError, match="act-order g_idx"):
        quantized_tensor_to_ct(qt)
    bias = torch.randn(16, dtype=torch.bfloat16)
    t = quantized_tensor_to_ct(qt, bias, actorder_group=True)
    assert torch.equal(t["weight_g_idx"], qt.g_idx) and t["bias"].dtype == torch.bfloat16
    assert torch.equal(ct_to_quantized_tensor(t, 4, 16, False).dequantize(), qt.dequantize())


def test_rtn_sym_is_stored_without_zero_points() -> None:
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    qt = quantize_rtn(w, QuantConfig(method="rtn", bits=4, group_size=32, sym=True))
    t = quantized_tensor_to_ct(qt)
    assert "weight_zero_point" not in t
    assert torch.equal(ct_to_quantized_tensor(t, 4, 32, True).dequantize(), qt.dequantize())


def test_refusals_name_the_reason() -> None:
    three = quantize_rtn(torch.randn(16, 64), QuantConfig(method="rtn", bits=3, group_size=32))
    with pytest.raises(InfqError, match="4 and 8 bits only, not 3"):
        quantized_tensor_to_ct(three)
    qt = _qt(16, 64, 4, 32, False, act_order=False, seed=4)
    lying = QuantizedTensor(qt.codes, qt.scales, qt.zeros, qt.g_idx, QuantScheme(4, 32, True), qt.shape)
    with pytest.raises(InfqError, match="cannot be written symmetric"):
        quantized_tensor_to_ct(lying)
    zeros = qt.zeros.clone()
    zeros[3, 1] = 16
    with pytest.raises(InfqError, match="zero point of 16"):
        quantized_tensor_to_ct(QuantizedTensor(qt.codes, qt.scales, zeros, qt.g_idx, qt.scheme, qt.shape))
    t = quantized_tensor_to_ct(qt)
    with pytest.raises(InfqError, match="weight_zero_point is missing"):
        ct_to_quantized_tensor({k: v for k, v in t.items() if k != "weight_zero_point"}, 4, 32, False)
    with pytest.raises(InfqError, match="check the config's group_size"):
        ct_to_quantized_tensor(t, 4, 16, False)


def test_config_matches_llmcompressor_presets() -> None:
    w4a16 = ct_quantization_config(QuantConfig(method="gptq", bits=4, group_size=128))
    ref = llmcompressor_config(4, 128, True)
    for key in ("quant_method", "format", "quantization_status", "ignore", "kv_cache_scheme"):
        assert w4a16[key] == ref[key], key
    group, ref_group = w4a16["config_groups"]["group_0"], ref["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    assert group["weights"] == ref_group["weights"]
    w8a16 = ct_quantization_config(QuantConfig(method="rtn", bits=8, group_size=-1))
    assert w8a16["config_groups"]["group_0"]["weights"] == llmcompressor_config(8, -1, True)["config_groups"]["group_0"]["weights"]
    act = ct_quantization_config(QuantConfig(method="gptq", desc_act=True, sym=False, skip=(r".*\.0\.mlp\..*",)))
    assert act["config_groups"]["group_0"]["weights"]["actorder"] == "group"
    assert act["config_groups"]["group_0"]["weights"]["symmetric"] is False
    assert act["ignore"] == ["lm_head", r"re:.*\.0\.mlp\..*"]
    back = parse_ct_config(act)
    assert (back.bits, back.group_size, back.sym, back.desc_act, back.static_groups) == (4, 128, False, True, False)
    assert back.skip == (r".*\.0\.mlp\..*",) and not back.lm_head
    static = ct_quantization_config(QuantConfig(method="gptq", desc_act=True, static_groups=True))
    assert static["config_groups"]["group_0"]["weights"]["actorder"] == "weight"
    with pytest.raises(InfqError, match="4 and 8 bits only"):
        ct_quantization_config(QuantConfig(method="gptq", bits=2))


@pytest.mark.parametrize(("bits", "gs", "sym", "actorder"), [
    (4, 128, True, None), (4, 128, False, None), (8, -1, True, None), (4, 32, True, "group"),
    (4, 32, True, "static"), (4, 32, False, "dynamic"),
])
def test_parse_presets(bits: int, gs: int, sym: bool, actorder: str | None) -> None:
    c = parse_ct_config(llmcompressor_config(bits, gs, sym, actorder))
    assert (c.bits, c.group_size, c.sym, c.desc_act, c.static_groups) == (
        bits, gs, sym, actorder is not None, actorder == "static")
    assert not c.lm_head and c.is_skipped("lm_head")


def _fp4() -> dict:
    d = llmcompressor_config(4, 16, True)
    g = d["config_groups"]["group_0"]
    g["weights"].update(type="float", symmetric=True)
    g["input_activations"] = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}
    d["format"] = g["format"] = "float-quantized"
    return d


def _w8a8_int() -> dict:
    d = llmcompressor_config(8, -1, True)
    d["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int", "strategy": "token",
                                                          "dynamic": True}
    d["format"] = d["config_groups"]["group_0"]["format"] = "int-quantized"
    return d


def _mixed() -> dict:
    d = llmcompressor_config(4, 128, True)
    d["config_groups"]["group_1"] = llmcompressor_config(8, -1, True)["config_groups"]["group_0"]
    return d


@pytest.mark.parametrize(("config", "reason"), [
    (_fp4(), "only FP8 is supported"),
    (_w8a8_int(), "also quantizes activations"),
    ({**llmcompressor_config(4, 128, True), "format": "naive-quantized",
      "config_groups": {"group_0": {**llmcompressor_config(4, 128, True)["config_groups"]["group_0"], "format": None}}},
     "infq reads 'pack-quantized'"),
    (llmcompressor_config(2, 128, True), "4 and 8 bits only, not 2"),
    ({**llmcompressor_config(4, 128, True), "quantization_status": "frozen"}, "not packed"),
    ({**llmcompressor_config(4, 128, True), "kv_cache_scheme": {"num_bits": 8, "type": "float"}}, "KV cache"),
    ({**llmcompressor_config(4, 128, True), "sparsity_config": {"format": "sparse-24-bitmask"}}, "sparse"),
    (_mixed(), "mixed precision"),
    ({**llmcompressor_config(4, 128, True), "quant_method": "gptq"}, "its own reader"),
])
def test_parse_refuses(config: dict, reason: str) -> None:
    with pytest.raises(InfqError) as e:
        parse_ct_config(config)
    assert reason in str(e.value) and "\n" not in str(e.value)


def test_parse_refuses_tensor_strategy() -> None:
    d = llmcompressor_config(8, -1, True)
    d["config_groups"]["group_0"]["weights"].update(strategy="tensor", group_size=None)
    with pytest.raises(InfqError, match="strategy 'tensor' is not supported"):
        parse_ct_config(d)


@pytest.mark.parametrize(("bits", "gs", "sym", "actorder", "dtype"), [
    (4, 32, True, None, torch.bfloat16),  # W4A16 of a bf16 model: bf16 scales
    (4, 32, False, None, torch.float16),  # W4A16_ASYM
    (8, -1, True, None, torch.float32),  # W8A16 (channel)
    (4, 16, True, "group", torch.float16),  # GPTQ actorder group: weight_g_idx
])
def test_llmcompressor_checkpoint_loads_exactly(tmp_path, bits, gs, sym, actorder, dtype) -> None:
    src = make_tiny_model(tmp_path / "src", dtype=dtype)
    rng = random.Random(bits * 10 + gs)
    out = tmp_path / "ct"

    def linear(o: int, i: int):
        return ct_linear(o, i, bits, gs, sym, rng, actorder=actorder is not None, scale_dtype=dtype)

    expected = build_checkpoint(src, out, linear, llmcompressor_config(bits, gs, sym, actorder))
    model = load_model(str(out), tokenizer=False).model
    for b in range(model.cfg.num_layers):
        for role, lin in model.blocks[b].linears.items():
            module = model.cfg.arch.linear_name(b, role)
            assert torch.equal(lin.weight, expected[module]), module
    info = inspect_checkpoint(str(out))
    assert info["format"] == "compressed-tensors" and info["quantization"]["format"] == "pack-quantized"
    linears = [t for t in info["tensors"] if t["name"].endswith("_proj.weight")]
    group = f"g{gs}" if gs > 0 else "gchannel"
    scheme = f"ct int{bits} {group} {'sym' if sym else 'asym'}{' act-order' if actorder else ''}"
    assert len(linears) == 14 and {t["scheme"] for t in linears} == {scheme}
    assert not [t for t in info["tensors"] if t["name"].rsplit(".", 1)[-1].startswith("weight_")]
    down = next(t for t in linears if t["name"] == "model.layers.1.mlp.down_proj.weight")
    assert down["shape"] == [64, 128] and down["params"] == 64 * 128


def test_compressed_tensors_library_decodes_our_bytes() -> None:
    """Peer oracle, when installed (pip install compressed-tensors): its config validation accepts what
    we write and its own decompressor returns our weights (bit-identical with fp32 scales; with fp16
    scales it computes in fp16, so it equals our exact weights rounded to fp16)."""
    pytest.importorskip("compressed_tensors")
    try:
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        pytest.skip("this test uses the compressed-tensors >= 0.20 compressor API")
    for config in (QuantConfig(method="rtn", bits=4, group_size=32), QuantConfig(method="rtn", bits=4, group_size=32, sym=False),
                   QuantConfig(method="rtn", bits=8, group_size=-1, sym=False)):
        scheme = QuantizationConfig.model_validate(ct_quantization_config(config)).config_groups["group_0"]
        qt = quantize_rtn(torch.randn(20, 64, generator=torch.Generator().manual_seed(0)), config)
        t = quantized_tensor_to_ct(qt)
        assert torch.equal(PackedQuantizationCompressor.decompress(dict(t), scheme)["weight"], qt.dequantize().half())
        t32 = dict(t, weight_scale=t["weight_scale"].float())
        assert torch.equal(PackedQuantizationCompressor.decompress(t32, scheme)["weight"], qt.dequantize())
