"""`PackedLayout` as the quantize pipeline uses it: encode RTN QuantizedTensors of a tiny model in
each format (one linear skipped), stream them through `write_shards`, and read the checkpoint back
with the runtime loader: every packed linear must equal its QuantizedTensor's dequantization and
the skipped one its original weight, exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tinymodels import make_tiny_model

from infq.errors import InfqError
from infq.formats.packed import PackedLayout, layout_from_config
from infq.formats.safetensors_io import write_shards
from infq.quantizers.rtn import quantize_rtn
from infq.quantizers.scheme import QuantConfig
from infq.runtime.loader import load_model

SKIPPED = "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize(("fmt", "checkpoint_format", "bits", "sym"), [
    ("gptq", "gptq", 4, True), ("gptq", "gptq_v2", 3, False), ("awq", "gptq", 4, False),
    ("compressed-tensors", "gptq", 4, True), ("compressed-tensors", "gptq", 8, False),
])
def test_layout_writes_what_the_loader_reads(tmp_path, fmt, checkpoint_format, bits, sym) -> None:
    src = make_tiny_model(tmp_path / "src", family="qwen2")
    config = QuantConfig(method="rtn", bits=bits, group_size=32, sym=sym, skip=(SKIPPED.replace(".", r"\."),))
    layout = PackedLayout(fmt, config, checkpoint_format)
    state = load_file(str(src / "model.safetensors"))
    expected = {}

    def stream():
        for name, tensor in state.items():
            module = name.removesuffix(".weight")
            if name.endswith("_proj.weight") and not config.is_skipped(module):
                qt = quantize_rtn(tensor, config)
                expected[module] = qt.dequantize()
                for part, t in layout.encode(qt).items():
                    yield f"{module}.{part}", t
            else:
                expected[module] = tensor
                yield name, tensor

    out = tmp_path / "out"
    out.mkdir()
    write_shards(out, stream())
    qc = layout.quantization_config(unquantized=[SKIPPED])
    hf = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**hf, "quantization_config": qc}))
    back = layout_from_config(fmt, qc)
    assert (back.config.bits, back.config.group_size, back.config.sym) == (bits, 32, sym)
    assert back.config.is_skipped(SKIPPED) and not back.config.is_skipped("model.layers.1.mlp.up_proj")
    if fmt == "awq":
        assert qc["modules_to_not_convert"] == [SKIPPED]
        with pytest.raises(ValueError, match="modules_to_not_convert"):
            layout.quantization_config()
    model = load_model(str(out), tokenizer=False).model
    for b in range(model.cfg.num_layers):
        for role, lin in model.blocks[b].linears.items():
            module = model.cfg.arch.linear_name(b, role)
            assert torch.equal(lin.weight, expected[module]), module


def test_unknown_formats_are_refused() -> None:
    with pytest.raises(InfqError, match="not a packed format"):
        PackedLayout("gguf", QuantConfig())
    with pytest.raises(InfqError, match="gguf checkpoints have no packed integer linears"):
        layout_from_config("gguf", {"quant_method": "gguf"})
    assert layout_from_config("fp8", {"quant_method": "fp8"}).is_fp8  # vLLM fp8 (test_fp8_format.py)
