"""`infq convert` through Typer's runner (--json, --force, refusals as one `error:` line, exit 2),
and eval / inspect / run on the AWQ and compressed-tensors checkpoints it writes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from clitools import error_line, invoke, last_json

from infq.quantizers.api import QuantizeRequest, quantize_model


def test_convert_help_does_not_import_torch():
    code = (
        "import sys\nfrom infq.cli.app import app\n"
        "try:\n    app(['convert', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def gptq(tmp_path_factory):
    from tinymodels import make_tiny_model

    root = tmp_path_factory.mktemp("cli-convert")
    src = make_tiny_model(root / "src")
    out = root / "gptq"
    quantize_model(QuantizeRequest(model=str(src), method="rtn", bits=4, group_size=32, sym=False, out=str(out)))
    return out


def test_convert_json_force_and_refusals(gptq, tmp_path):
    out = tmp_path / "awq"
    obj = last_json(invoke("convert", gptq, "--to", "awq", "--out", out, "--json"))
    assert set(obj) >= {"src", "out", "from", "to", "linears", "verified", "seconds"}
    assert (obj["from"], obj["to"], obj["out"], obj["linears"], obj["verified"]) == ("gptq", "awq", str(out), 14, True)
    line = error_line(invoke("convert", gptq, "--to", "awq", "--out", out))
    assert "already exists" in line and "--force" in line
    r = invoke("convert", gptq, "--to", "awq", "--out", out, "--force")
    assert r.exit_code == 0 and "verified" in r.output and str(out) in r.output
    assert "already awq" in error_line(invoke("convert", out, "--to", "awq", "--out", tmp_path / "x"))
    assert "GPTQ v1" in error_line(invoke("convert", out, "--to", "gptq", "--gptq-format", "gptq", "--out", tmp_path / "x"))
    assert "use gptq, awq, compressed-tensors" in error_line(invoke("convert", out, "--to", "exl2", "--out", tmp_path / "x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["awq"]


@pytest.mark.parametrize("to,scheme", [("awq", "awq int4 g32 asym"), ("compressed-tensors", "ct int4 g32 asym")])
def test_eval_inspect_run_on_converted(gptq, tmp_path, to, scheme):
    out = tmp_path / "out"
    last_json(invoke("convert", gptq, "--to", to, "--out", out, "--json"))
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"line {i} of some text to score, with words." for i in range(200)))
    ppl = [last_json(invoke("eval", p, "--ppl", text, "--seqlen", 64, "--limit", 2, "--json")) for p in (gptq, out)]
    assert ppl[1]["format"] == to and ppl[1]["ppl"] == ppl[0]["ppl"]  # same weights, same numbers
    info = last_json(invoke("inspect", out, "--json"))
    packed = [t for t in info["tensors"] if t["name"].endswith("_proj.weight")]
    assert info["format"] == to and len(packed) == 14 and {t["scheme"] for t in packed} == {scheme}
    assert info["parameters"] == sum(t["params"] for t in info["tensors"])
    args = ("--prompt", "hello", "--max-new-tokens", 4, "--ignore-eos", "--json")
    runs = [last_json(invoke("run", p, *args)) for p in (gptq, out)]
    assert runs[1]["token_ids"] == runs[0]["token_ids"]
    r = invoke("inspect", out)
    assert r.exit_code == 0 and scheme in r.output
