"""GPTQ checkpoints written per the spec by the test itself (AutoGPTQ v1 and GPTQModel v2
layouts, act-order g_idx, 2/3/4/8 bits) load into the runtime with exactly the weights they encode."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file
from tinymodels import make_tiny_model

from infq.formats.inspect import inspect_checkpoint
from infq.runtime.loader import load_model


def _to_i32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


def _pack(values: list[int], bits: int) -> list[int]:
    """LSB-first bit stream cut into 32-bit words (spec A.1.4), with Python integers."""
    stream = 0
    for k, v in enumerate(values):
        stream |= v << (k * bits)
    return [_to_i32((stream >> (32 * w)) & 0xFFFFFFFF) for w in range(len(values) * bits // 32)]


def _linear(out: int, inp: int, bits: int, gs: int, sym: bool, act_order: bool, fmt: str, rng: random.Random):
    maxq, groups = (1 << bits) - 1, inp // gs
    codes = [[rng.randint(0, maxq) for _ in range(out)] for _ in range(inp)]  # [in][out]
    zeros = [[(1 << (bits - 1)) if sym else rng.randint(1, maxq) for _ in range(out)] for _ in range(groups)]
    scales = torch.rand(groups, out, generator=torch.Generator().manual_seed(rng.randint(0, 10**6))).half() / 10 + 0.01
    g_idx = [i // gs for i in range(inp)]
    if act_order:
        rng.shuffle(g_idx)  # each group still has gs members, in scattered columns
    shift = 1 if fmt == "gptq" else 0
    qweight = [[0] * out for _ in range(inp * bits // 32)]
    for o in range(out):
        for r, word in enumerate(_pack([codes[i][o] for i in range(inp)], bits)):
            qweight[r][o] = word
    qzeros = [_pack([z - shift for z in zeros[g]], bits) for g in range(groups)]
    expected = torch.tensor(
        [[(codes[i][o] - zeros[g_idx[i]][o]) * float(scales[g_idx[i], o]) for i in range(inp)] for o in range(out)]
    )
    tensors = {
        "qweight": torch.tensor(qweight, dtype=torch.int32), "qzeros": torch.tensor(qzeros, dtype=torch.int32),
        "scales": scales, "g_idx": torch.tensor(g_idx, dtype=torch.int32),
    }
    return tensors, expected


CASES = [  # bits, group, sym, act_order, checkpoint format, writer style
    (4, 32, True, True, "gptq", "autogptq"),
    (4, 64, False, False, "gptq_v2", "gptqmodel"),
    (3, 32, True, False, "gptq", "autogptq"),
    (2, 32, False, True, "gptq_v2", "gptqmodel"),
    (8, 64, True, False, "gptq", "autogptq"),
]


@pytest.mark.parametrize("bits,gs,sym,act,fmt,style", CASES)
def test_peer_layout_loads_exactly(tmp_path, bits, gs, sym, act, fmt, style):
    src = make_tiny_model(tmp_path / "src", hidden_size=64, intermediate_size=128)
    state = load_file(str(src / "model.safetensors"))
    out = tmp_path / "gptq"
    out.mkdir()
    rng = random.Random(bits * 100 + gs)
    tensors, expected = {}, {}
    for name in list(state):
        if name.endswith("_proj.weight"):
            module = name.removesuffix(".weight")
            o, i = state.pop(name).shape
            parts, expected[module] = _linear(o, i, bits, gs, sym, act, fmt, rng)
            tensors.update({f"{module}.{k}": v for k, v in parts.items()})
    tensors.update(state)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    qc = {"bits": bits, "group_size": gs, "desc_act": act, "sym": sym, "damp_percent": 0.01,
          "static_groups": False, "true_sequential": True, "quant_method": "gptq"}
    if style == "autogptq":
        qc.update(model_name_or_path=None, model_file_base_name="model")
    else:
        qc.update(checkpoint_format=fmt, meta={"quantizer": ["gptqmodel:1.9.0"]}, pack_dtype="int32")
    cfg = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    (out / "quantize_config.json").write_text(json.dumps(qc))
    (out / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    model = load_model(str(out), tokenizer=False).model
    arch = model.cfg.arch
    for b in range(model.cfg.num_layers):
        for role, lin in model.blocks[b].linears.items():
            module = arch.linear_name(b, role)
            assert torch.equal(lin.weight, expected[module]), module
    info = inspect_checkpoint(str(out))
    assert info["format"] == "gptq"
    schemes = {t["scheme"] for t in info["tensors"] if "_proj" in t["name"]}
    assert schemes == {f"gptq int{bits} g{gs} {'sym' if sym else 'asym'}{' act-order' if act else ''}"}
