"""`convert_checkpoint`: lossless round trips between GPTQ (v1/v2), AWQ GEMM and compressed-tensors,
checked against independent oracles (RTN's own dequantization, the integer-loop AutoAWQ layout of
tests/peer_layouts.py, the source checkpoint's bytes and logits), and every refusal of a lossy
conversion, which must leave nothing behind."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peer_layouts import (
    autoawq_config,
    awq_linear,
    build_checkpoint,
    ct_linear,
    llmcompressor_config,
)
from safetensors.torch import load_file, save_file
from tinymodels import make_tiny_model

from infq.errors import InfqError
from infq.formats.convert import ConvertRequest, convert_checkpoint
from infq.quantizers.api import QuantizeRequest, quantize_model
from infq.quantizers.rtn import quantize_rtn
from infq.quantizers.scheme import QuantConfig
from infq.runtime.loader import load_model

TOKENS = torch.tensor([[1, 40, 77, 5, 300, 12, 9, 250, 3, 101, 64, 8]])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("convert")
    src = make_tiny_model(root / "src", family="qwen2")  # qkv biases: carried over as stored
    made = {}
    for name, bits, sym in (("sym", 4, True), ("asym", 4, False), ("w8", 8, True), ("w3", 3, True)):
        made[name] = root / f"gptq-{name}"
        quantize_model(QuantizeRequest(model=str(src), method="rtn", bits=bits, group_size=32, sym=sym,
                                       out=str(made[name])))
    rng = random.Random(7)
    awq_expected = build_checkpoint(src, root / "awq-peer", lambda o, i: awq_linear(o, i, 32, rng), autoawq_config(32))
    return SimpleNamespace(root=root, src=src, awq=root / "awq-peer", awq_expected=awq_expected, **made)


def convert(src: Path, to: str, out: Path, **kw) -> dict:
    return convert_checkpoint(ConvertRequest(str(src), to, str(out), **kw))


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_model(str(path), tokenizer=False).model(TOKENS)


def qconfig(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


def linears(path: Path) -> dict[str, torch.Tensor]:
    model = load_model(str(path), tokenizer=False).model
    arch = model.cfg.arch
    return {arch.linear_name(b, role): lin.weight for b in range(model.cfg.num_layers)
            for role, lin in model.blocks[b].linears.items()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_gptq_sym_to_ct_and_back_is_identical(ckpts, tmp_path) -> None:
    ct, back = tmp_path / "ct", tmp_path / "back"
    r = convert(ckpts.sym, "compressed-tensors", ct)
    assert (r["from"], r["to"], r["linears"], r["verified"]) == ("gptq", "compressed-tensors", 14, True)
    assert r["checkpoint_format"] is None and r["seconds"] >= 0 and r["warnings"] == []
    qc = qconfig(ct)
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["symmetric"] is True
    stored = tensors(ct)
    assert not [n for n in stored if n.endswith(("weight_zero_point", "qweight", "g_idx"))]
    assert stored["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float16  # carried as the GPTQ stored it
    assert (ct / "tokenizer.json").is_file() and not (ct / "quantize_config.json").exists()
    r = convert(ct, "gptq", back)
    assert (r["to"], r["checkpoint_format"]) == ("gptq", "gptq")  # sym -> v1, the widest-read convention
    assert_same_tensors(tensors(back), tensors(ckpts.sym))  # byte for byte the original GPTQ
    assert json.loads((back / "quantize_config.json").read_text()) == qconfig(back)
    original = load_file(str(ckpts.src / "model.safetensors"))
    oracle = QuantConfig(method="rtn", bits=4, group_size=32)
    for module, weight in linears(ct).items():
        assert torch.equal(weight, quantize_rtn(original[f"{module}.weight"].float(), oracle).dequantize()), module
    reference = logits(ckpts.sym)
    assert torch.equal(logits(ct), reference) and torch.equal(logits(back), reference)


def test_gptq_asym_v2_to_ct_and_back(ckpts, tmp_path) -> None:
    assert qconfig(ckpts.asym)["checkpoint_format"] == "gptq_v2"
    convert(ckpts.asym, "compressed-tensors", tmp_path / "ct")
    assert any(n.endswith("weight_zero_point") for n in tensors(tmp_path / "ct"))
    r = convert(tmp_path / "ct", "gptq", tmp_path / "back")
    assert r["checkpoint_format"] == "gptq_v2"
    assert_same_tensors(tensors(tmp_path / "back"), tensors(ckpts.asym))
    with pytest.raises(InfqError, match="GPTQ v1"):
        convert(tmp_path / "ct", "gptq", tmp_path / "v1", gptq_format="gptq")
    assert not (tmp_path / "v1").exists()


def test_awq_to_gptq_v2_and_back(ckpts, tmp_path) -> None:
    g = tmp_path / "gptq"
    r = convert(ckpts.awq, "gptq", g)
    assert (r["from"], r["to"], r["checkpoint_format"]) == ("awq", "gptq", "gptq_v2")
    qc = qconfig(g)
    assert (qc["checkpoint_format"], qc["sym"], qc["bits"], qc["group_size"]) == ("gptq_v2", False, 4, 32)
    for module, weight in linears(g).items():  # the integer-loop oracle's weights, exactly
        assert torch.equal(weight, ckpts.awq_expected[module]), module
    assert torch.equal(logits(g), logits(ckpts.awq))
    convert(g, "awq", tmp_path / "awq")
    convert(ckpts.awq, "compressed-tensors", tmp_path / "ct")
    convert(tmp_path / "ct", "awq", tmp_path / "awq2")
    peer = tensors(ckpts.awq)
    for out in ("awq", "awq2"):  # AutoAWQ's bytes come back unchanged
        assert_same_tensors(tensors(tmp_path / out), peer)


def test_v1_v2_repack(ckpts, tmp_path) -> None:
    r = convert(ckpts.sym, "gptq", tmp_path / "v2", gptq_format="gptq_v2")
    assert r["checkpoint_format"] == "gptq_v2" and qconfig(tmp_path / "v2")["checkpoint_format"] == "gptq_v2"
    qzeros = tensors(tmp_path / "v2")["model.layers.0.mlp.up_proj.qzeros"]
    assert set(qzeros.view(-1).tolist()) == {-2004318072}  # 0x88888888: v2 stores the true zero 8
    convert(tmp_path / "v2", "gptq", tmp_path / "v1", gptq_format="gptq")
    assert_same_tensors(tensors(tmp_path / "v1"), tensors(ckpts.sym))


def test_8bit_to_ct_and_3bit_stays(ckpts, tmp_path) -> None:
    convert(ckpts.w8, "compressed-tensors", tmp_path / "ct8")
    assert torch.equal(logits(tmp_path / "ct8"), logits(ckpts.w8))
    with pytest.raises(InfqError, match="AWQ GEMM format is 4-bit only"):
        convert(ckpts.w8, "awq", tmp_path / "awq8")
    with pytest.raises(InfqError, match="vLLM reads at 4 and 8 bits only"):
        convert(ckpts.w3, "compressed-tensors", tmp_path / "ct3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct8"]  # refusals leave nothing, not even .partial


def _copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    for name in ("config.json", "quantize_config.json"):
        if (dst / name).exists():
            d = json.loads((dst / name).read_text())
            qc = d.get("quantization_config", d)
            qc.update(config_changes)
            (dst / name).write_text(json.dumps(d))
    return dst


def _rewrite(path: Path, name: str, fn) -> None:
    state = tensors(path)
    state[name] = fn(state[name])
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def _gptq_meta(path: Path) -> dict:
    return {**qconfig(path)["meta"], "infq_method": "gptq"}  # act-order is a GPTQ setting, not RTN's


def test_config_level_refusals(ckpts, tmp_path) -> None:
    act = _copy(ckpts.sym, tmp_path / "act", desc_act=True, meta=_gptq_meta(ckpts.sym))
    cases = [
        (ckpts.awq, "awq", {}, "already awq"),
        (ckpts.sym, "gptq", {}, "already gptq (gptq)"),
        (ckpts.src, "gptq", {}, "is not quantized"),
        (ckpts.sym, "exl2", {}, "not a format infq converts to"),
        (ckpts.sym, "gguf", {}, "--to gguf needs --type"),
        (ckpts.sym, "awq", {"gptq_format": "gptq_v2"}, "--gptq-format gptq_v2 needs --to gptq"),
        (act, "awq", {}, "act-order"),
    ]
    for src, to, kw, reason in cases:
        with pytest.raises(InfqError) as e:
            convert(src, to, tmp_path / "out", **kw)
        assert reason in str(e.value) and "\n" not in str(e.value), (to, str(e.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["act"]


def test_act_order_into_ct_keeps_g_idx_and_warns(ckpts, tmp_path) -> None:
    act = _copy(ckpts.sym, tmp_path / "act", desc_act=True, meta=_gptq_meta(ckpts.sym))
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    _rewrite(act, "model.layers.0.mlp.down_proj.g_idx", lambda g: g[perm].contiguous())
    r = convert(act, "compressed-tensors", tmp_path / "ct")
    assert len(r["warnings"]) == 1 and "actorder 'group'" in r["warnings"][0]
    assert qconfig(tmp_path / "ct")["config_groups"]["group_0"]["weights"]["actorder"] == "group"
    assert torch.equal(tensors(tmp_path / "ct")["model.layers.0.mlp.down_proj.weight_g_idx"],
                       tensors(act)["model.layers.0.mlp.down_proj.g_idx"])
    convert(tmp_path / "ct", "gptq", tmp_path / "back")
    assert_same_tensors(tensors(tmp_path / "back"), tensors(act))


def test_tensor_level_refusals_leave_nothing(ckpts, tmp_path) -> None:
    static = _copy(ckpts.sym, tmp_path / "static", desc_act=True, static_groups=True, meta=_gptq_meta(ckpts.sym))
    convert(static, "awq", tmp_path / "ok")  # static groups keep g_idx = arange // group_size: fine
    _rewrite(static, "model.layers.1.mlp.down_proj.g_idx", lambda g: g.flip(0).contiguous())
    with pytest.raises(InfqError, match="act-order g_idx"):
        convert(static, "awq", tmp_path / "awq")
    v1_asym = _copy(ckpts.asym, tmp_path / "v1asym", checkpoint_format="gptq")
    _rewrite(v1_asym, "model.layers.0.self_attn.q_proj.qzeros", lambda z: torch.full_like(z, -1))  # stored 15 -> 16
    for to, reason in (("gptq", "cannot be stored in 'gptq_v2'"), ("compressed-tensors", "zero point of 16"),
                       ("awq", "zero point of 16")):
        kw = {"gptq_format": "gptq_v2"} if to == "gptq" else {}
        with pytest.raises(InfqError, match=reason):
            convert(v1_asym, to, tmp_path / "out", **kw)
    rng = random.Random(3)
    fp32 = tmp_path / "ct-fp32"
    build_checkpoint(ckpts.src, fp32, lambda o, i: ct_linear(o, i, 4, 32, True, rng, scale_dtype=torch.float32),
                     llmcompressor_config(4, 32, True))
    with pytest.raises(InfqError, match="float16 scales"):
        convert(fp32, "gptq", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct-fp32", "ok", "static", "v1asym"]


def test_force_and_output_safety(ckpts, tmp_path) -> None:
    out = tmp_path / "ct"
    convert(ckpts.sym, "compressed-tensors", out)
    with pytest.raises(InfqError, match="--force"):
        convert(ckpts.asym, "compressed-tensors", out)
    assert qconfig(out)["config_groups"]["group_0"]["weights"]["symmetric"] is True  # untouched
    convert(ckpts.asym, "compressed-tensors", out, force=True)
    assert qconfig(out)["config_groups"]["group_0"]["weights"]["symmetric"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # no .partial, no old copy
    with pytest.raises(InfqError, match="holds the source"):
        convert(out, "gptq", out, force=True)
    with pytest.raises(InfqError, match="holds the source"):
        convert(out, "gptq", tmp_path, force=True)
    src_config = json.loads((ckpts.sym / "config.json").read_text())
    out_config = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in out_config.items() if k != "quantization_config"} == {
        k: v for k, v in src_config.items() if k != "quantization_config"}
