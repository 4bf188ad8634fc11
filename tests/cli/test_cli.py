"""The CLI through Typer's runner: help without torch, eval/inspect/run, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from clitools import invoke
from typer.testing import CliRunner

from infq import __version__
from infq.cli.app import app


@pytest.mark.parametrize("sub", [None, "quantize", "eval", "run", "inspect"])
def test_help_does_not_import_torch(sub):
    argv = ["--help"] if sub is None else [sub, "--help"]
    code = (
        "import sys\nfrom infq.cli.app import app\n"
        f"try:\n    app({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("sub", ["quantize", "run", "bench"])
def test_help_keeps_bracketed_defaults(sub):
    """A help text's "[default: ...]" written by hand must print: rich reads an unescaped "[...]" as
    markup and drops it (once "--block-size" printed "Tokens per KV block .")."""
    import re

    import typer.main

    cmd = typer.main.get_command(app).commands[sub]
    helps = [getattr(p, "help", None) or "" for p in cmd.params]
    expected = [m.group(0) for h in helps for m in re.finditer(r"\[default: [^]]*\]", h)]
    assert expected, f"{sub}: no hand-written defaults to check"
    r = CliRunner().invoke(app, [sub, "--help"], env={"COLUMNS": "400", "TERM": "dumb"})
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    for text in expected:
        assert " ".join(text.split()) in flat, f"{sub} --help lost {text!r}"


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and __version__ in r.output


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("\n".join(f"line {i} of some text to score, with words." for i in range(400)))
    return path


def test_eval_json(tiny_model, text_file):
    r = invoke("eval", tiny_model, "--ppl", text_file, "--seqlen", 64, "--limit", 3, "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout.strip().splitlines()[-1])
    assert obj["windows"] == 3 and obj["seqlen"] == 64 and obj["protocol"] == "gptq"
    assert obj["tokens"] == 192 and 1 < obj["ppl"] < 10_000
    r2 = invoke("eval", tiny_model, "--ppl", text_file, "--seqlen", 64, "--limit", 3, "--protocol", "llamacpp", "--json")
    obj2 = json.loads(r2.stdout.strip().splitlines()[-1])
    assert obj2["protocol"] == "llamacpp" and obj2["ppl"] != obj["ppl"]


def test_inspect_json(tiny_model):
    r = invoke("inspect", tiny_model, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["format"] == "hf" and info["model_type"] == "llama"
    assert info["parameters"] == sum(t["params"] for t in info["tensors"])
    assert info["bits_per_weight"] == pytest.approx(32.0)


def test_run_greedy_json(tiny_model):
    args = ("run", tiny_model, "--prompt", "hello", "--max-new-tokens", 5, "--ignore-eos", "--json")
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert len(obj["token_ids"]) == 5 and obj["tokens_per_s"] >= 0
    assert json.loads(invoke(*args).stdout)["token_ids"] == obj["token_ids"]  # greedy is deterministic


def _bad(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs(tmp_path, tiny_model, text_file):
    _bad(invoke("eval", tmp_path / "nope", "--ppl", text_file), "no such file")
    (tmp_path / "empty").mkdir()
    _bad(invoke("eval", tmp_path / "empty", "--ppl", text_file), "no config.json")
    cfg = json.loads((tiny_model / "config.json").read_text())
    cfg["model_type"] = "bloom"
    (tiny_model / "config.json").write_text(json.dumps(cfg))
    _bad(invoke("eval", tiny_model, "--ppl", text_file), "bloom", "llama, mistral, qwen2")
    cfg["model_type"] = "llama"
    (tiny_model / "config.json").write_text(json.dumps(cfg))
    _bad(invoke("eval", tiny_model, "--ppl", text_file, "--seqlen", 4096), "exceeds", "256")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    _bad(invoke("eval", tiny_model, "--ppl", short, "--seqlen", 64), "tokens", "64")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _bad(invoke("eval", tiny_model, "--ppl", empty))
    st = tiny_model / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    _bad(invoke("eval", tiny_model, "--ppl", text_file), "truncated")


def test_named_dataset_offline_names_the_way_out(tiny_model):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "infq.cli", "eval", str(tiny_model), "--ppl", "wikitext"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode == 2
    assert "--dataset" in out.stderr and "Traceback" not in out.stderr


def test_quantize_json_and_bad_inputs(tmp_path, tiny_model, text_file):
    out = tmp_path / "q"
    args = ("quantize", "--model", tiny_model, "--method", "gptq", "--bits", 4, "--group-size", 32,
            "--dataset", text_file, "--nsamples", 4, "--seqlen", 32, "--out", out)
    r = invoke(*args, "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("out", "method", "bits", "group_size", "seconds", "peak_rss_bytes", "bits_per_weight"):
        assert key in obj
    assert obj["out"] == str(out) and 4 < obj["bits_per_weight"] < 5
    _bad(invoke(*args), "already exists", "--force")
    _bad(invoke("quantize", "--model", tiny_model, "--bits", 5, "--out", tmp_path / "b"), "bits 5", "2, 3, 4 or 8")
    _bad(invoke("quantize", "--model", tiny_model, "--group-size", 48, "--out", tmp_path / "b"), "48", "divide")
    _bad(invoke("quantize", "--model", tiny_model, "--damp", 2, "--out", tmp_path / "b"), "damp")
    _bad(invoke("quantize", "--model", tiny_model, "--method", "kquant", "--bits", 4, "--out", tmp_path / "b"), "--bits", "--type")
    _bad(invoke("quantize", "--model", tiny_model, "--method", "awq", "--bits", 8, "--group-size", 32, "--out", tmp_path / "b"),
         "AWQ GEMM format is 4-bit only", "--format gptq")
    _bad(invoke("quantize", "--model", tiny_model, "--format", "exl2", "--group-size", 32, "--out", tmp_path / "b"), "--format exl2", "gptq")
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    _bad(invoke("quantize", "--model", tiny_model, "--dataset", short, "--nsamples", 4, "--seqlen", 32,
                "--group-size", 32, "--out", tmp_path / "b"), "tokens")
    assert not (tmp_path / "b").exists()
    r = invoke("eval", out, "--ppl", text_file, "--seqlen", 64, "--limit", 2, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout.strip().splitlines()[-1])["format"] == "gptq"


def test_error_lines_keep_square_brackets():
    """Errors are printed through rich: text like `infq[bench]` or a bad value in brackets must not
    be eaten as markup."""

    r = CliRunner().invoke(app, ["quantize", "--method", "kquant", "--type", "Q9_K[x]", "--out", "unused"])
    assert r.exit_code == 2
    assert "Q9_K[X]" in r.output
