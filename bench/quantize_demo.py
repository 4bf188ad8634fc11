"""Perplexity, size, time and peak RSS of fp, RTN, GPTQ and AWQ on the bundled demo model.

Usage: python bench/quantize_demo.py [--methods rtn,gptq,awq] [--nsamples 128] [--seqlen 512] [--limit 0] [--out DIR]

Quantizes the demo model with RTN and GPTQ at 8/4/3-bit g128 and 4-bit per-channel, and with AWQ
at 4-bit g128 (AWQ GEMM format) and 3-bit g128 (written as GPTQ v2, since the GEMM format is
4-bit only), calibrating on the demo corpus's calibration split; then scores every checkpoint and
the fp16 original on the demo corpus's evaluation split (GPTQ protocol, seqlen 512). Each step runs
as its own `infq ... --json` process, so the peak RSS reported is that step's own. Rows of methods
not named in --methods are kept from the existing results file. Writes
bench/results/quantize_demo.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from common import RESULTS, infq, write

CONFIGS = {"rtn": [(8, 128), (4, 128), (3, 128), (4, -1)], "gptq": [(8, 128), (4, 128), (3, 128), (4, -1)],
           "awq": [(4, 128), (3, 128)]}
EXTRA = {("awq", 3): ["--format", "gptq"]}  # the AWQ GEMM format is 4-bit only


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--limit", type=int, default=0, help="eval windows (0 = all)")
    p.add_argument("--methods", default="rtn,gptq,awq")
    p.add_argument("--out", default=None, help="where checkpoints go (default: a temp dir)")
    args = p.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="infq-bench-"))
    limit = ["--limit", str(args.limit)] if args.limit else []
    ev = ["--ppl", "demo", "--seqlen", str(args.eval_seqlen), *limit]
    methods = args.methods.split(",")
    old = RESULTS / "quantize_demo.json"
    kept = [r for r in json.loads(old.read_text())["rows"] if r["method"] not in methods + ["fp16"]] if old.exists() else []
    rows = []
    fp = infq("eval", "demo", *ev)
    size = infq("inspect", "demo")["bytes_on_disk"]
    rows.append({"method": "fp16", "bits": 16, "group_size": None, "ppl": fp["ppl"], "bytes": size})
    print(f"fp16: ppl {fp['ppl']:.4f}, {size} bytes", flush=True)
    for method in methods:
        for bits, gs in CONFIGS[method]:
            out = work / f"{method}-w{bits}g{gs}"
            q = infq("quantize", "--method", method, "--bits", bits, "--group-size", gs, "--out", out,
                     "--force", "--nsamples", args.nsamples, "--seqlen", args.seqlen,
                     *EXTRA.get((method, bits), []))
            e = infq("eval", out, *ev)
            row = {
                "method": method, "bits": bits, "group_size": gs, "format": q["format"], "sym": q["sym"],
                "ppl": e["ppl"],
                "ppl_vs_fp_pct": 100 * (e["ppl"] / fp["ppl"] - 1), "bytes": q["bytes_after"],
                "bits_per_weight": q["bits_per_weight"], "quantize_s": q["seconds"],
                "quantize_wall_s": q["wall_s"], "peak_rss_bytes": q["peak_rss_bytes"],
            }
            rows.append(row)
            print(f"{method} w{bits} g{gs}: ppl {e['ppl']:.4f} ({row['ppl_vs_fp_pct']:+.2f}%), "
                  f"{q['seconds']:.1f} s, peak RSS {q['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    path = write("quantize_demo.json", {
        "eval": {"dataset": "demo", "protocol": "gptq", "seqlen": args.eval_seqlen, "windows": fp["windows"],
                 "tokens": fp["tokens"]},
        "calibration": {"dataset": "demo", "nsamples": args.nsamples, "seqlen": args.seqlen},
        "rows": rows[:1] + kept + rows[1:],
    })
    print(f"wrote {path}")
    if not args.out:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
