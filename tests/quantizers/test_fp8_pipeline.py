"""`infq quantize --method fp8` end to end on tiny models: every layout and activation scheme written,
read back with exactly the weights `quantize_fp8` gives for the original weights, configs as the
format says, `infq eval` / `infq inspect` on the result, and every bad input as one `error:` line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from infq.cli.app import app
from infq.errors import InfqError
from infq.quantizers.api import QuantizeRequest, quantize_model
from infq.quantizers.calibrate import LayerStats
from infq.quantizers.fp8 import quantize_fp8
from infq.quantizers.scheme import QuantConfig
from infq.runtime.linear import Fp8Linear
from infq.runtime.loader import load_model

runner = CliRunner()


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text(" ".join(f"word{i % 97} and some text {i}" for i in range(3000)))
    return f


@pytest.mark.parametrize(("fmt", "weight_scale", "act"), [
    ("compressed-tensors", "channel", "dynamic"), ("compressed-tensors", "tensor", "static"),
    ("compressed-tensors", "channel", "none"), ("fp8", "tensor", "static"), ("fp8", "tensor", "dynamic"),
])
def test_fp8_checkpoint_reads_back_exactly(tmp_path, tiny_model, text_file, fmt, weight_scale, act):
    out = tmp_path / "q"
    req = QuantizeRequest(model=str(tiny_model), method="fp8", weight_scale=weight_scale, act_scheme=act,
                          format="auto" if fmt == "compressed-tensors" else fmt, dataset=str(text_file),
                          nsamples=4, seqlen=32, out=str(out))
    res = quantize_model(req)
    assert res["format"] == fmt and res["quantized_linears"] == 14 and res["bits"] == 8
    assert res["nsamples"] == (4 if act == "static" else 0)  # dynamic / weight-only need no data
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    if fmt == "fp8":
        assert qc == {"quant_method": "fp8", "activation_scheme": act, "ignored_layers": ["lm_head"]}
    else:
        assert qc["format"] == ("naive-quantized" if act == "none" else "float-quantized")
    original = load_file(str(tiny_model / "model.safetensors"))
    stored = load_file(str(out / "model.safetensors"))
    model = load_model(str(out), tokenizer=False).model
    config = QuantConfig(method="fp8", bits=8, group_size=-1, weight_scale=weight_scale, act_scheme="none")
    for i in range(2):
        for role, lin in model.blocks[i].linears.items():
            module = model.cfg.arch.linear_name(i, role)
            expected = quantize_fp8(original[f"{module}.weight"], LayerStats(1), config)[0]
            assert isinstance(lin, Fp8Linear) and lin.act == act
            assert torch.equal(stored[f"{module}.weight"].view(torch.uint8), expected.codes.view(torch.uint8)), module
            assert torch.equal(lin.weight, expected.dequantize()), module
            if act == "static":  # written from the staged blocks: input_scale survives staging
                assert lin.input_scale.item() == stored[f"{module}.input_scale"].item() > 0
            else:
                assert f"{module}.input_scale" not in stored
    assert "lm_head.weight" in stored and stored["lm_head.weight"].dtype == original["lm_head.weight"].dtype


def test_eval_and_inspect_cli(tmp_path, tiny_model, text_file):
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", "--model", str(tiny_model), "--method", "fp8", "--act-scheme", "static",
                            "--act-percentile", "99.9", "--dataset", str(text_file), "--nsamples", "4",
                            "--seqlen", "32", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout.strip().splitlines()[-1])
    assert obj["act_percentile"] == 99.9 and 8 < obj["bits_per_weight"] < 9
    r = runner.invoke(app, ["eval", str(out), "--ppl", str(text_file), "--seqlen", "64", "--limit", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["format"] == "compressed-tensors"
    r = runner.invoke(app, ["inspect", str(out), "--json"])
    info = json.loads(r.stdout)
    assert info["quantization"]["act_scheme"] == "static"
    assert {t["scheme"] for t in info["tensors"] if t["name"].endswith("_proj.weight")} == {"ct fp8 e4m3 w:channel a:static"}


def _bad(args, *needles):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs(tmp_path, tiny_model):
    q = ["quantize", "--model", tiny_model, "--out", tmp_path / "b"]
    _bad([*q, "--method", "fp8", "--format", "fp8", "--weight-scale", "channel"], "one weight scale per tensor")
    _bad([*q, "--method", "fp8", "--format", "fp8", "--weight-scale", "tensor", "--act-scheme", "none"], "no weight-only mode")
    _bad([*q, "--method", "fp8", "--format", "gptq"], "--format compressed-tensors or --format fp8")
    _bad([*q, "--method", "fp8", "--group-size", 32], "no groups", "--weight-scale")
    _bad([*q, "--method", "fp8", "--asym"], "symmetric")
    _bad([*q, "--method", "fp8", "--bits", 4], "bits 4", "fp8")
    _bad([*q, "--method", "fp8", "--act-scheme", "token"], "act_scheme 'token'")
    _bad([*q, "--method", "fp8", "--act-percentile", 99], "act_percentile applies")
    _bad([*q, "--method", "gptq", "--weight-scale", "tensor"], "--weight-scale applies to --method fp8 only")
    _bad([*q, "--method", "fp8", "--format", "compressed-tensors", "--act-scheme", "static", "--act-percentile", 0],
         "out of range")
    assert not (tmp_path / "b").exists()


def test_non_finite_weights_refused(tmp_path, tiny_model):
    st = tiny_model / "model.safetensors"
    state = load_file(str(st))
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, str(st), metadata={"format": "pt"})
    _bad(["quantize", "--model", tiny_model, "--method", "fp8", "--out", tmp_path / "b"], "NaN or inf", "--skip")
    with pytest.raises(InfqError, match="NaN or inf"):
        quantize_model(QuantizeRequest(model=str(tiny_model), method="fp8", out=str(tmp_path / "c")))
