"""`quantize_model` end to end on tiny models: RTN written in the GPTQ layout, read back exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tinymodels import make_tiny_model

from infq.errors import InfqError
from infq.quantizers.api import QuantizeRequest, quantize_model
from infq.quantizers.rtn import quantize_rtn
from infq.quantizers.scheme import QuantConfig
from infq.runtime.loader import load_model


@pytest.mark.parametrize("family,bits,group,sym", [("llama", 4, 32, True), ("qwen2", 3, -1, False), ("llama", 8, 64, True)])
def test_rtn_checkpoint_reads_back_exactly(tmp_path, family, bits, group, sym):
    src = make_tiny_model(tmp_path / "src", family=family)
    out = tmp_path / "q"
    req = QuantizeRequest(model=str(src), method="rtn", bits=bits, group_size=group, sym=sym, out=str(out))
    res = quantize_model(req)
    assert res["out"] == str(out) and res["quantized_linears"] == 2 * 7
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["sym"] == sym
    assert (out / "quantize_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".q.tmp-*"))
    original = load_file(str(src / "model.safetensors"))
    model = load_model(str(out), tokenizer=False).model
    config = QuantConfig(method="rtn", bits=bits, group_size=group, sym=sym)
    for i in range(2):
        for role, lin in model.blocks[i].linears.items():
            name = f"{model.cfg.arch.linear_name(i, role)}.weight"
            expected = quantize_rtn(original[name].float(), config).dequantize()
            assert torch.equal(lin.weight, expected), name
    assert torch.equal(model.embed_weight, original["model.embed_tokens.weight"])
    if family == "qwen2":  # biases survive (as fp16, the GPTQ layout)
        b = model.blocks[0].linears["q"].bias
        assert torch.allclose(b, original["model.layers.0.self_attn.q_proj.bias"], atol=1e-3)


def test_output_is_never_clobbered_without_force(tmp_path, tiny_model):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    req = QuantizeRequest(model=str(tiny_model), method="rtn", out=str(out), group_size=32)
    with pytest.raises(InfqError, match="--force"):
        quantize_model(req)
    assert (out / "keep.txt").read_text() == "mine"
    quantize_model(QuantizeRequest(**{**req.__dict__, "force": True}))
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_bad_requests(tmp_path, tiny_model):
    base = dict(model=str(tiny_model), method="rtn", out=str(tmp_path / "q"))
    with pytest.raises(InfqError, match="bits 5"):
        quantize_model(QuantizeRequest(**base, bits=5))
    with pytest.raises(InfqError, match="does not divide the input dim 64"):
        quantize_model(QuantizeRequest(**base, group_size=48))
    with pytest.raises(InfqError, match="damp"):
        quantize_model(QuantizeRequest(**{**base, "method": "gptq"}, damp_percent=1.5))
    assert not (tmp_path / "q").exists()


def _interrupting_method(monkeypatch, fail_at_call: int | None):
    """Method 'gptq' (so the driver runs forwards and collects Hessians) solved by RTN; optionally
    interrupted, as by Ctrl-C, at the given linear."""
    import infq.quantizers.api as api

    calls = {"n": 0}

    def fn(weight, stats, config):
        calls["n"] += 1
        if calls["n"] == fail_at_call:
            raise KeyboardInterrupt
        assert stats.hessian is not None
        return quantize_rtn(weight, config), {"loss": 0.0}

    monkeypatch.setattr(api, "method_fn", lambda method: fn)
    return calls


def test_interrupted_run_resumes_byte_identical(tmp_path, monkeypatch):
    src = make_tiny_model(tmp_path / "src", num_hidden_layers=3)
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"calibration line {i} with some words" for i in range(300)))
    base = dict(model=str(src), method="gptq", group_size=32, dataset=str(text), nsamples=4, seqlen=32)
    _interrupting_method(monkeypatch, None)
    quantize_model(QuantizeRequest(**base, out=str(tmp_path / "whole")))
    _interrupting_method(monkeypatch, 7 + 3)  # inside block 1
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        quantize_model(QuantizeRequest(**base, out=str(out)))
    assert not out.exists() and (tmp_path / ".cut.partial").is_dir()
    with pytest.raises(InfqError, match="--resume"):
        quantize_model(QuantizeRequest(**base, out=str(out)))
    with pytest.raises(InfqError, match="another model, dataset or config"):
        quantize_model(QuantizeRequest(**{**base, "nsamples": 5}, out=str(out), resume=True))
    calls = _interrupting_method(monkeypatch, None)
    res = quantize_model(QuantizeRequest(**base, out=str(out), resume=True))
    assert res["resumed_blocks"] == 1 and calls["n"] == 2 * 7
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert not (tmp_path / ".cut.partial").exists()


def test_gptq_end_to_end_beats_rtn_on_logits(tmp_path):
    """Real GPTQ through the driver: its checkpoint's logits sit closer to fp than RTN's."""
    src = make_tiny_model(tmp_path / "src", hidden_size=128, intermediate_size=256)
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"line {i}: the quick brown fox {i % 7} jumps over {i % 13} lazy dogs" for i in range(400)))
    base = dict(model=str(src), bits=3, group_size=32, dataset=str(text), nsamples=16, seqlen=64)
    res = quantize_model(QuantizeRequest(**base, method="gptq", out=str(tmp_path / "g")))
    quantize_model(QuantizeRequest(**base, method="rtn", out=str(tmp_path / "r")))
    assert res["nsamples"] == 16 and res["seqlen"] == 64 and res["format"] == "gptq"
    from infq.eval.datasets import calibration_windows
    from infq.formats.hf import load_tokenizer

    ids = calibration_windows(load_tokenizer(src), str(text), 8, 64, seed=1)
    ref = load_model(str(src), tokenizer=False).model(ids)
    err = {k: (load_model(str(tmp_path / k), tokenizer=False).model(ids) - ref).pow(2).mean().item() for k in "gr"}
    assert err["g"] < 0.8 * err["r"], err


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_lm_head_quantized_only_when_asked(tmp_path, method):
    src = make_tiny_model(tmp_path / "src")
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"some calibration text number {i}" for i in range(200)))
    req = QuantizeRequest(model=str(src), method=method, group_size=32, dataset=str(text), nsamples=4,
                          seqlen=32, lm_head=True, out=str(tmp_path / "q"))
    res = quantize_model(req)
    assert res["quantized_linears"] == 2 * 7 + 1
    stored = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert "lm_head.qweight" in stored and "lm_head.weight" not in stored
    model = load_model(str(tmp_path / "q"), tokenizer=False).model
    original = load_file(str(src / "model.safetensors"))["lm_head.weight"]
    err = (model.lm_head.weight - original).abs()
    assert 0 < err.max() < 0.1  # quantized, close
    if method == "rtn":
        assert torch.equal(model.lm_head.weight, quantize_rtn(original, QuantConfig(method="rtn", group_size=32)).dequantize())
    tied = make_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    with pytest.raises(InfqError, match="tied"):
        quantize_model(QuantizeRequest(**{**req.__dict__, "model": str(tied), "out": str(tmp_path / "t")}))


@pytest.mark.parametrize(("method", "sym"), [("rtn", True), ("awq", False)])
def test_format_choice_writes_the_same_weights(tmp_path, method, sym):
    """--format only changes the layout: compressed-tensors and GPTQ outputs of one run dequantize
    to identical weights and give identical logits."""
    from infq.formats.detect import detect_format

    src = make_tiny_model(tmp_path / "src")
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"calibration line {i} with some words" for i in range(300)))
    base = dict(model=str(src), method=method, bits=4, group_size=32, sym=sym, dataset=str(text), nsamples=4, seqlen=32)
    quantize_model(QuantizeRequest(**base, format="gptq", out=str(tmp_path / "g")))
    res = quantize_model(QuantizeRequest(**base, format="compressed-tensors", out=str(tmp_path / "c")))
    assert res["format"] == "compressed-tensors" and detect_format(tmp_path / "c") == "compressed-tensors"
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    a = load_model(str(tmp_path / "g"), tokenizer=False).model(ids)
    b = load_model(str(tmp_path / "c"), tokenizer=False).model(ids)
    assert torch.equal(a, b)
