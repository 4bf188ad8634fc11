"""`infq run` and `infq bench` through Typer's runner on the demo model with small settings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from clitools import invoke


def _objs(result):
    return [json.loads(line) for line in result.stdout.strip().splitlines()]


def _bad(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_bench_help_does_not_import_torch():
    code = ("import sys\nfrom infq.cli.app import app\ntry:\n    app(['bench', '--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0\nassert 'torch' not in sys.modules\n")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_run_json_and_streaming():
    r = invoke("run", "demo", "--prompt", "def add(a, b):", "--max-new-tokens", 12, "--ignore-eos", "--json")
    assert r.exit_code == 0, r.output
    (obj,) = _objs(r)
    assert len(obj["token_ids"]) == 12 and obj["ttft_s"] > 0 and obj["tokens_per_s"] > 0 and obj["text"]
    assert obj["kv_cache_bytes"] > 0 and obj["peak_rss_bytes"] > 0
    s = invoke("run", "demo", "--prompt", "def add(a, b):", "--max-new-tokens", 12, "--ignore-eos")
    assert s.exit_code == 0 and obj["text"] in s.stdout and "TTFT" in s.output  # streamed text, then stats


def test_run_prompts_file_batches_and_reports_rejections(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": p}) for p in ["import os", "x = " + "1 + " * 400, "class A:"]))
    args = ("run", "demo", "--prompts-file", f, "--max-new-tokens", 8, "--ignore-eos", "--json")
    r = invoke(*args)
    assert r.exit_code == 2  # one prompt was rejected ...
    objs = _objs(r)
    assert len(objs) == 3 and "context" in objs[1]["error"]
    assert len(objs[0]["token_ids"]) == 8 and len(objs[2]["token_ids"]) == 8  # ... the others ran
    alone = _objs(invoke("run", "demo", "--prompt", "class A:", "--max-new-tokens", 8, "--ignore-eos", "--json"))
    assert alone[0]["token_ids"] == objs[2]["token_ids"]  # batching does not change greedy outputs
    sampled = [_objs(invoke("run", "demo", "--prompt", "import", "--max-new-tokens", 8, "--temperature", 0.8,
                            "--seed", 5, "--kv-dtype", kvd, "--block-size", 4, "--json"))[0]["token_ids"]
               for kvd in ("auto", "auto")]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize("args,needles", [
    (("--prompt", "x", "--max-new-tokens", 600), ("512",)),
    (("--prompt", "x", "--kv-memory", "1k"), ("one KV block",)),
    (("--prompt", "x", "--kv-memory", "lots"), ("not a size",)),
    (("--prompt", "x", "--top-p", 0), ("--top-p",)),
    (("--prompt", "x", "--temperature", -1), ("--temperature",)),
    (("--prompt", "x", "--kv-dtype", "int4"), ("--kv-dtype",)),
    (("--prompt", "x", "--block-size", 0), ("--block-size",)),
    ((), ("--prompt",)),
    (("--prompts-file", "/nonexistent.txt"), ("no such file",)),
    (("--prompt", "x", "--cuda-graphs"), ("--cuda-graphs", "--device cuda")),
])
def test_run_bad_inputs(args, needles):
    _bad(invoke("run", "demo", *args), *needles)


def test_bench_cuda_graphs_needs_cuda():
    _bad(invoke("bench", "demo", "--cuda-graphs"), "--cuda-graphs", "--device cuda")


def test_bench_json_small(tmp_path):
    chart = tmp_path / "chart.png"
    r = invoke("bench", "demo", "--batch-sizes", "1,2", "--prompt-len", 8, "--gen-len", 4, "--requests", 6,
               "--rate", 100, "--prompt-lens", "4:16", "--output-lens", "2:12", "--system-len", 32, "--chart", chart,
               "--json")
    assert r.exit_code == 0, r.output
    (obj,) = _objs(r)
    assert set(obj["decode_tokens_per_s"]) == {"1", "2"} and all(v > 0 for v in obj["decode_tokens_per_s"].values())
    assert obj["engine"]["block_size"] == 8 and obj["engine"]["cuda_graphs"] is False  # the CPU defaults
    assert "hf_decode_tokens_per_s" in obj and "transformers" in obj
    for name in ("continuous", "static"):
        w = obj[name]
        assert w["requests"] == 6 and w["throughput_tokens_per_s"] > 0 and w["ttft_p95_s"] >= w["ttft_p50_s"] > 0
        assert 0 <= w["kv_unused_fraction_steady"] < 1
    assert obj["continuous"]["output_tokens"] == obj["static"]["output_tokens"]  # same workload, same outputs
    assert obj["prefix_cache"]["ttft_on_s"] > 0 and chart.stat().st_size > 1000 and obj["chart"] == str(chart)
    _bad(invoke("bench", "demo", "--batch-sizes", "1,x", "--json"), "--batch-sizes")
    _bad(invoke("bench", "demo", "--gen-len", 1, "--json"), "--gen-len")
    _bad(invoke("bench", "demo", "--output-lens", "500:600", "--json"), "holds 512")
