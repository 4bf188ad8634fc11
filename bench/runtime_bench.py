"""Serving benchmark of infq's runtime: `infq bench` on the demo model (and a GPTQ copy of it),
on the CPU and, where one is present, a CUDA GPU; writes bench/results/runtime_<setting>.json and a
PNG chart beside each. Every run is a fresh `infq bench ... --json` process, so the transformers
baseline and infq are measured in the same process on the same machine.

    python bench/runtime_bench.py                 # all settings this machine has
    python bench/runtime_bench.py --only cpu_fp32  # one of them
    python bench/runtime_bench.py --quick          # small sizes, to check that it runs
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, infq, write

# The workload: prompts and outputs spanning the demo model's 512-token context (the CLI's own default,
# 16:128 / 8:192, is the short workload, run again as cpu_fp32_short_workload).
WORKLOAD = ["--prompt-lens", "32:256", "--output-lens", "16:256"]
SHORT = ["--prompt-lens", "16:128", "--output-lens", "8:192"]
QUICK = ["--batch-sizes", "1,4", "--gen-len", "8", "--requests", "8", "--output-lens", "4:32", "--prompt-lens",
         "8:32", "--system-len", "64"]


def settings(gptq_dir: Path) -> dict[str, list[str]]:
    import torch

    out = {
        "cpu_fp32": ["demo", "--device", "cpu", "--dtype", "float32", *WORKLOAD],
        "cpu_fp32_short_workload": ["demo", "--device", "cpu", "--dtype", "float32", *SHORT, "--batch-sizes", "1",
                                    "--no-hf", "--no-prefix"],
        # the H200 runs' request count and rate (all 256 requests queued within ~1.3 s): a long steady state
        "cpu_fp32_short_256": ["demo", "--device", "cpu", "--dtype", "float32", *SHORT, "--batch-sizes", "1",
                               "--no-hf", "--no-prefix", "--requests", "256", "--rate", "200"],
        "cpu_fp32_kv_int8": ["demo", "--device", "cpu", "--dtype", "float32", "--kv-dtype", "int8", "--no-hf",
                             *WORKLOAD],
        "cpu_gptq_w4": [str(gptq_dir), "--device", "cpu", "--dtype", "float32", *WORKLOAD],
    }
    if torch.cuda.is_available():
        big = ["--batch-sizes", "1,2,4,8,16,32,64,128", "--requests", "256", "--rate", "200", *WORKLOAD]
        out["cuda_bf16"] = ["demo", "--device", "cuda", "--dtype", "bfloat16", *big]
        out["cuda_bf16_graphs"] = ["demo", "--device", "cuda", "--dtype", "bfloat16", "--cuda-graphs", "--no-hf", *big]
        out["cuda_fp16_kv_fp8"] = ["demo", "--device", "cuda", "--dtype", "float16", "--kv-dtype", "fp8", "--no-hf",
                                   *big]
    return out


def _commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent)
    return out.stdout.strip() or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", help="run only these settings")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run; results not written)")
    ap.add_argument("--note", help="recorded in each JSON (e.g. that the machine was shared)")
    ap.add_argument("--suffix", default="", help="results go to runtime_<setting><suffix>.json")
    ap.add_argument("--extra", default="", help="more `infq bench` arguments for every setting, space-separated")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        gptq = Path(tmp) / "demo-gptq-w4g128"
        runs = settings(gptq)
        if not args.only or "cpu_gptq_w4" in args.only:
            subprocess.run([sys.executable, "-m", "infq", "quantize", "--method", "gptq", "--bits", "4", "--out",
                            str(gptq), "--nsamples", "32", "--json"], check=True, capture_output=True)
        for name, cli in runs.items():
            if args.only and name not in args.only:
                continue
            chart = RESULTS / f"runtime_{name}{args.suffix}.png"
            extra = (QUICK if args.quick else []) + args.extra.split()
            result = infq("bench", *cli, *extra, "--chart", str(chart) if not args.quick else "", timeout=3600)
            summary = {k: result.get(k) for k in ("decode_tokens_per_s", "hf_decode_tokens_per_s",
                                                  "engine_decode_tokens_per_s_batch1", "continuous_over_static")}
            print(name, summary, flush=True)
            if not args.quick:
                extra_info = {"note": args.note} if args.note else {}
                write(f"runtime_{name}{args.suffix}.json", {"setting": name, "code": _commit(), **extra_info,
                                                            "command": ["infq", "bench", *cli, *extra, "--json"],
                                                            "result": result})


if __name__ == "__main__":
    main()
