"""FP8 on disk and at run time: compressed-tensors float-quantized / naive-quantized and vLLM fp8 tensors
(round trips of e4m3 codes and scales, shapes and dtypes per §A.3), configs against llm-compressor's
and AutoFP8's, checkpoints built tensor by tensor from the spec (tests/peer_layouts.py) that must load
with exactly the weights they encode, the FP8 linear against a float64 oracle, and refusals."""

from __future__ import annotations

import random

import pytest
import torch
from peer_layouts import autofp8_config, build_checkpoint, fp8_linear, llmcompressor_fp8_config
from safetensors.torch import load_file
from tinymodels import make_tiny_model

from infq.errors import InfqError
from infq.formats.compressed_tensors import ct_quantization_config, parse_ct_config
from infq.formats.fp8 import (
    fp8_to_quantized_tensor,
    parse_vllm_fp8_config,
    quantized_tensor_to_fp8,
    vllm_fp8_config,
)
from infq.formats.inspect import inspect_checkpoint
from infq.formats.packed import PackedLayout
from infq.kernels.dispatch import fp8_linear_scaled_mm
from infq.kernels.ref import fp8_linear_ref
from infq.quantizers.calibrate import LayerStats
from infq.quantizers.fp8 import quantize_fp8
from infq.quantizers.scheme import QuantConfig
from infq.runtime.linear import Fp8Linear
from infq.runtime.loader import load_model


def _config(weight_scale: str = "channel", act: str = "dynamic") -> QuantConfig:
    return QuantConfig(method="fp8", bits=8, group_size=-1, weight_scale=weight_scale, act_scheme=act)


def _stats(inp: int, amax: float) -> LayerStats:
    stats = LayerStats(inp)
    x = torch.randn(5, inp, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    x[3, 2] = amax
    stats.add_batch(x, frozenset({"amax", "token_amax"}))
    return stats.finish()


@pytest.mark.parametrize("layout", ["compressed-tensors", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("weight_scale", "act"), [("tensor", "static"), ("channel", "dynamic"), ("channel", "none"),
                                                   ("tensor", "dynamic")])
def test_round_trip(layout: str, dtype: torch.dtype, weight_scale: str, act: str) -> None:
    if layout == "fp8" and (weight_scale == "channel" or act == "none"):
        return  # refused, see test_writer_refusals
    out, inp = 24, 40
    w = (torch.randn(out, inp, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    config = _config(weight_scale, act)
    qt, _ = quantize_fp8(w, _stats(inp, 13.0), config)
    bias = torch.randn(out).to(dtype)
    t = quantized_tensor_to_fp8(qt, bias, config, layout)
    assert set(t) == {"weight", "weight_scale", "bias"} | ({"input_scale"} if act == "static" else set())
    assert t["weight"].dtype == torch.float8_e4m3fn and t["weight"].shape == (out, inp)
    if layout == "fp8":  # AutoFP8: F32 scalars
        assert t["weight_scale"].dtype == torch.float32 and t["weight_scale"].shape == ()
        assert act != "static" or (t["input_scale"].dtype == torch.float32 and t["input_scale"].shape == ())
    else:  # compressed-tensors: model dtype, [1] / [out, 1]
        assert t["weight_scale"].dtype == dtype
        assert t["weight_scale"].shape == ((1,) if weight_scale == "tensor" else (out, 1))
        assert act != "static" or (t["input_scale"].dtype == dtype and t["input_scale"].shape == (1,))
    back = fp8_to_quantized_tensor(t, config)
    assert torch.equal(back.codes.view(torch.uint8), qt.codes.view(torch.uint8))
    assert torch.equal(back.scales.float(), qt.scales.float()) and torch.equal(back.dequantize(), qt.dequantize())
    if act == "static":
        assert back.input_scale.item() == qt.input_scale.item()
    else:
        assert back.input_scale is None


def test_configs_match_llmcompressor_and_autofp8() -> None:
    for ws, act in (("tensor", "static"), ("channel", "dynamic"), ("channel", "none"), ("tensor", "dynamic")):
        ours = ct_quantization_config(_config(ws, act))
        ref = llmcompressor_fp8_config(ws, act)
        for key in ("quant_method", "format", "quantization_status", "ignore", "kv_cache_scheme"):
            assert ours[key] == ref[key], (ws, act, key)
        group, ref_group = ours["config_groups"]["group_0"], ref["config_groups"]["group_0"]
        for part in ("weights", "input_activations"):
            theirs = ref_group[part] and {k: v for k, v in ref_group[part].items() if k not in ("scale_dtype", "zp_dtype")}
            assert group[part] == theirs, (ws, act, part)
        for config in (ours, ref):
            back = parse_ct_config(config)
            assert (back.method, back.weight_scale, back.act_scheme, back.lm_head) == ("fp8", ws, act, False)
    for static in (True, False):
        ours = vllm_fp8_config(_config("tensor", "static" if static else "dynamic"))
        assert ours == autofp8_config(static)
        back = parse_vllm_fp8_config(ours)
        assert (back.weight_scale, back.act_scheme, back.lm_head) == ("tensor", "static" if static else "dynamic", False)
    skipping = vllm_fp8_config(_config("tensor"), ["model.layers.0.mlp.down_proj"])
    assert skipping["ignored_layers"] == ["lm_head", "model.layers.0.mlp.down_proj"]
    assert parse_vllm_fp8_config(skipping).is_skipped("model.layers.0.mlp.down_proj")
    assert not parse_vllm_fp8_config(skipping).is_skipped("model.layers.10.mlp.down_proj")


@pytest.mark.parametrize(("layout", "strategy", "act", "dtype"), [
    ("compressed-tensors", "tensor", "static", torch.bfloat16),  # llm-compressor FP8
    ("compressed-tensors", "channel", "dynamic", torch.float16),  # FP8_DYNAMIC
    ("compressed-tensors", "channel", "none", torch.float32),  # FP8 weight-only (naive-quantized)
    ("fp8", "tensor", "static", torch.bfloat16),  # AutoFP8 static
    ("fp8", "tensor", "dynamic", torch.float16),  # AutoFP8 dynamic
])
def test_peer_checkpoint_loads_exactly(tmp_path, layout: str, strategy: str, act: str, dtype: torch.dtype) -> None:
    src = make_tiny_model(tmp_path / "src", dtype=dtype)
    rng = random.Random(len(layout) + len(strategy) + len(act))

    def linear(o: int, i: int):
        tensors, weight, _ = fp8_linear(o, i, strategy, act == "static", rng, scale_dtype=dtype, layout=layout)
        return tensors, weight

    qc = autofp8_config(act == "static") if layout == "fp8" else llmcompressor_fp8_config(strategy, act)
    expected = build_checkpoint(src, tmp_path / "q", linear, qc)
    stored = load_file(str(tmp_path / "q" / "model.safetensors"))
    loaded = load_model(str(tmp_path / "q"), tokenizer=False)
    assert loaded.format == layout
    model = loaded.model
    for b in range(model.cfg.num_layers):
        for role, lin in model.blocks[b].linears.items():
            module = model.cfg.arch.linear_name(b, role)
            assert isinstance(lin, Fp8Linear) and lin.act == act, module
            assert torch.equal(lin.weight, expected[module]), module
            assert (lin.input_scale is None) == (act != "static")
            if act == "static":
                assert lin.input_scale.item() == stored[f"{module}.input_scale"].item()
    info = inspect_checkpoint(str(tmp_path / "q"))
    label = "ct" if layout == "compressed-tensors" else "fp8"
    linears = [t for t in info["tensors"] if t["name"].endswith("_proj.weight")]
    assert len(linears) == 14 and {t["scheme"] for t in linears} == {f"{label} fp8 e4m3 w:{strategy} a:{act}"}
    down = next(t for t in linears if t["name"] == "model.layers.1.mlp.down_proj.weight")
    assert down["shape"] == [64, 128] and down["bytes"] >= 64 * 128
    assert info["quantization"]["act_scheme"] == act
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(ids)).all()


def _oracle(x: torch.Tensor, w8: torch.Tensor, sw: torch.Tensor, act: str, s_in: float | None) -> torch.Tensor:
    """Y = (X8 W8^T) s_x s_w in float64 (§B.3), activations quantized with torch's e4m3 cast."""
    x64 = x.double()
    if act == "static":
        s = torch.tensor(s_in, dtype=torch.float64)
    else:
        s = x64.abs().amax(-1, keepdim=True) / 448
    x8 = (x64 / s).clamp(-448, 448).float().to(torch.float8_e4m3fn).double()
    return (x8 @ w8.double().T) * s * sw.double().T if act != "none" else x64 @ (w8.double() * sw.double()).T


@pytest.mark.parametrize(("act", "per_tensor"), [("dynamic", False), ("static", True), ("static", False), ("none", False)])
def test_fp8_linear_against_float64(act: str, per_tensor: bool) -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(48, 64, generator=g) * 0.1
    qt, _ = quantize_fp8(w, _stats(64, 3.0), _config("tensor" if per_tensor else "channel", act))
    x = torch.randn(2, 5, 64, generator=g)
    x[0, 1] *= 100  # a token past the static scale: saturates, never NaN
    lin = Fp8Linear(qt, None, act, per_tensor)
    y = lin(x)
    s_in = None if qt.input_scale is None else qt.input_scale.item()
    ref = _oracle(x.reshape(-1, 64), qt.codes, qt.scales.float(), act, s_in).reshape(2, 5, 48)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    try:
        mm = fp8_linear_scaled_mm(x, qt.codes, qt.scales.float(), None, act, qt.input_scale, per_tensor)
    except (RuntimeError, NotImplementedError):  # _scaled_mm on CPU needs a recent PyTorch
        return
    if act != "none":
        assert torch.allclose(mm.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        assert torch.allclose(mm, fp8_linear_ref(x, qt.codes, qt.scales, None, act, qt.input_scale), rtol=1e-5, atol=1e-4)


def test_writer_refusals() -> None:
    qt, _ = quantize_fp8(torch.randn(8, 16), LayerStats(16), _config("channel", "dynamic"))
    with pytest.raises(InfqError, match="one weight scale per tensor"):
        PackedLayout("fp8", _config("channel", "dynamic"))
    with pytest.raises(InfqError, match="no weight-only mode"):
        PackedLayout("fp8", _config("tensor", "none"))
    with pytest.raises(InfqError, match="--format compressed-tensors or --format fp8"):
        PackedLayout("gptq", _config())
    with pytest.raises(InfqError, match="cannot store"):
        quantized_tensor_to_fp8(qt, None, _config("tensor", "dynamic"), "compressed-tensors")
    with pytest.raises(InfqError, match="calibrated input_scale"):
        quantized_tensor_to_fp8(qt, None, _config("channel", "static"), "compressed-tensors")
    with pytest.raises(InfqError, match="stores --method fp8"):
        PackedLayout("fp8", QuantConfig(method="rtn", bits=8, group_size=-1))


def _ct(mutate) -> dict:
    d = llmcompressor_fp8_config("channel", "dynamic")
    mutate(d["config_groups"]["group_0"])
    return d


@pytest.mark.parametrize(("config", "needle"), [
    (_ct(lambda g: g["input_activations"].update(dynamic=False)), "static token activation scales cannot be stored"),
    (_ct(lambda g: g["weights"].update(strategy="block", block_structure=[128, 128])), "block-wise"),
    (_ct(lambda g: g["weights"].update(num_bits=4)), "only FP8"),
    (_ct(lambda g: g.update(output_activations={"num_bits": 8, "type": "float"})), "output activations"),
    (_ct(lambda g: g["input_activations"].update(type="int")), "infq reads FP8"),
    ({**llmcompressor_fp8_config("channel", "dynamic"), "format": "pack-quantized",
      "config_groups": {"group_0": {**llmcompressor_fp8_config("channel", "dynamic")["config_groups"]["group_0"],
                                    "format": None}}}, "not an FP8 layout"),
])
def test_reader_refusals(config: dict, needle: str) -> None:
    with pytest.raises(InfqError) as e:
        parse_ct_config(config)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_vllm_and_tensor_refusals() -> None:
    with pytest.raises(InfqError, match="block-wise FP8"):
        parse_vllm_fp8_config({**autofp8_config(False), "weight_block_size": [128, 128]})
    with pytest.raises(InfqError, match="activation_scheme 'none'"):
        parse_vllm_fp8_config({**autofp8_config(False), "activation_scheme": "none"})
    scale = torch.tensor(0.5)
    with pytest.raises(InfqError, match="E5M2"):
        fp8_to_quantized_tensor({"weight": torch.zeros(4, 8).to(torch.float8_e5m2), "weight_scale": scale}, _config())
    w = torch.zeros(4, 8).to(torch.float8_e4m3fn)
    with pytest.raises(InfqError, match="block-wise"):
        fp8_to_quantized_tensor({"weight": w, "weight_scale": torch.ones(2, 2)}, _config())
    with pytest.raises(InfqError, match="input_scale is missing"):
        fp8_to_quantized_tensor({"weight": w, "weight_scale": scale}, _config("tensor", "static"))
    with pytest.raises(InfqError, match="per-token scales are dynamic only"):
        fp8_to_quantized_tensor({"weight": w, "weight_scale": scale, "input_scale": torch.ones(4, 1)},
                                _config("tensor", "static"))
    with pytest.raises(InfqError, match="zero, negative"):
        fp8_to_quantized_tensor({"weight": w, "weight_scale": torch.zeros(())}, _config())


def test_convert_between_fp8_layouts(tmp_path) -> None:
    """llm-compressor FP8 (per-tensor, static) -> vLLM fp8 -> compressed-tensors, verified and exact."""
    from infq.formats.convert import ConvertRequest, convert_checkpoint

    src = make_tiny_model(tmp_path / "src", dtype=torch.bfloat16)
    rng = random.Random(7)

    def linear(o: int, i: int):
        tensors, weight, _ = fp8_linear(o, i, "tensor", True, rng, scale_dtype=torch.bfloat16)
        return tensors, weight

    expected = build_checkpoint(src, tmp_path / "ct", linear, llmcompressor_fp8_config("tensor", "static"))
    stored = load_file(str(tmp_path / "ct" / "model.safetensors"))
    res = convert_checkpoint(ConvertRequest(str(tmp_path / "ct"), "fp8", str(tmp_path / "vllm")))
    assert res["verified"] and res["linears"] == 14
    convert_checkpoint(ConvertRequest(str(tmp_path / "vllm"), "compressed-tensors", str(tmp_path / "back")))
    for out, fmt in ((tmp_path / "vllm", "fp8"), (tmp_path / "back", "compressed-tensors")):
        loaded = load_model(str(out), tokenizer=False)
        assert loaded.format == fmt
        lin = loaded.model.blocks[1].linears["down"]
        assert torch.equal(lin.weight, expected["model.layers.1.mlp.down_proj"])
        assert lin.input_scale.item() == stored["model.layers.1.mlp.down_proj.input_scale"].item()
    with pytest.raises(InfqError, match="FP8 weights are written as compressed-tensors"):
        convert_checkpoint(ConvertRequest(str(tmp_path / "ct"), "gptq", str(tmp_path / "g")))


def test_compressed_tensors_library_decodes_our_fp8() -> None:
    """Peer oracle, when installed (pip install compressed-tensors): its config validation accepts what
    we write and its float-quantized decompressor returns our weights (it multiplies in the fp16 scale
    dtype, so it equals our exact fp32 weights rounded to fp16)."""
    pytest.importorskip("compressed_tensors")
    try:
        from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        pytest.skip("this test uses the compressed-tensors >= 0.19 compressor API")
    for ws, act in (("tensor", "static"), ("channel", "dynamic")):
        config = _config(ws, act)
        scheme = QuantizationConfig.model_validate(ct_quantization_config(config)).config_groups["group_0"]
        qt, _ = quantize_fp8(torch.randn(20, 64).half(), _stats(64, 5.0), config)
        t = quantized_tensor_to_fp8(qt, None, config, "compressed-tensors")
        out = FloatQuantizationCompressor.decompress(dict(t), scheme)["weight"]
        assert out.dtype == torch.float16 and torch.equal(out, qt.dequantize().half())  # ours, rounded to fp16
