"""Perplexity and size of FP8 checkpoints of the bundled demo model against its fp16 original.

Usage: python bench/fp8_demo.py [--limit 150] [--nsamples 128] [--seqlen 512] [--out DIR]

Quantizes the demo model with `--method fp8` for every weight scale (tensor, channel) and
activation scheme (none = weight-only, static = calibrated per-tensor input scales on the demo
corpus's calibration split, dynamic = per token at run time), written as compressed-tensors, plus
the per-tensor static and dynamic checkpoints in vLLM's fp8 layout; then scores each, and the fp16
original, on the demo corpus's evaluation split (GPTQ protocol, seqlen 512, the first --limit
windows; CPU, so activations are quantized and dequantized in float32 by the reference path). Each
step is its own `infq ... --json` process. Writes bench/results/fp8_demo.json.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from common import infq, write

CONFIGS = [  # (weight scale, activation scheme, format)
    ("tensor", "none", "compressed-tensors"), ("channel", "none", "compressed-tensors"),
    ("tensor", "static", "compressed-tensors"), ("channel", "static", "compressed-tensors"),
    ("tensor", "dynamic", "compressed-tensors"), ("channel", "dynamic", "compressed-tensors"),
    ("tensor", "static", "fp8"), ("tensor", "dynamic", "fp8"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--limit", type=int, default=150, help="eval windows (0 = all 607)")
    p.add_argument("--out", default=None, help="where checkpoints go (default: a temp dir)")
    args = p.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="infq-fp8-"))
    ev = ["--ppl", "demo", "--seqlen", str(args.eval_seqlen), *(["--limit", str(args.limit)] if args.limit else [])]
    fp = infq("eval", "demo", *ev)
    size = infq("inspect", "demo")["bytes_on_disk"]
    rows = [{"method": "fp16", "ppl": fp["ppl"], "bytes": size}]
    print(f"fp16: ppl {fp['ppl']:.4f}, {size} bytes", flush=True)
    for scale, act, fmt in CONFIGS:
        out = work / f"fp8-{fmt}-{scale}-{act}"
        q = infq("quantize", "--method", "fp8", "--weight-scale", scale, "--act-scheme", act, "--format", fmt,
                 "--out", out, "--force", "--nsamples", args.nsamples, "--seqlen", args.seqlen)
        e = infq("eval", out, *ev)
        row = {"method": "fp8", "weight_scale": scale, "act_scheme": act, "format": fmt, "ppl": e["ppl"],
               "ppl_vs_fp_pct": 100 * (e["ppl"] / fp["ppl"] - 1), "bytes": q["bytes_after"],
               "bits_per_weight": q["bits_per_weight"], "calibration_windows": q["nsamples"],
               "quantize_s": q["seconds"], "peak_rss_bytes": q["peak_rss_bytes"]}
        rows.append(row)
        print(f"fp8 {fmt} w:{scale} a:{act}: ppl {e['ppl']:.4f} ({row['ppl_vs_fp_pct']:+.3f}%), "
              f"{q['bytes_after']} bytes, {q['seconds']:.1f} s", flush=True)
    path = write("fp8_demo.json", {
        "eval": {"dataset": "demo", "protocol": "gptq", "seqlen": args.eval_seqlen, "windows": fp["windows"],
                 "tokens": fp["tokens"], "device": "cpu", "dtype": fp["dtype"]},
        "calibration": {"dataset": "demo", "nsamples": args.nsamples, "seqlen": args.seqlen,
                        "used_by": "act_scheme static only"},
        "rows": rows,
    })
    print(f"wrote {path}")
    if not args.out:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
