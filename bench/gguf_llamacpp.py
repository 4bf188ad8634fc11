"""GGUF K-quants on the demo model: llama.cpp's llama-quantize vs infq, with and without an imatrix.

Usage: python bench/gguf_llamacpp.py [--only llamacpp|infq|all] [--types Q8_0,Q6_K,...] [--chunks N]
       [--eval wikitext2,demo] [--calib-chunks 128] [--work DIR] [--llamacpp /work/peers/llamacpp]

Part `llamacpp` (needs a llama.cpp build, see /work/peers/llamacpp/READY): convert the demo model
to an F16 GGUF with llama.cpp's convert_hf_to_gguf.py and with `infq convert --type F16`. The
demo tokenizer is a tokenizer.json-only byte-fallback BPE: llama.cpp's converter writes every token
score as -1000 for it, so llama.cpp then merges leftmost-first and tokenizes differently from the
BPE the model was trained with (a much higher perplexity, the first rows); infq writes merge-rank
scores, with which llama.cpp tokenizes as the original does. So llama-imatrix and llama-quantize
run on infq's F16 file (same fp16 weights and llama metadata), and both tools' quantized files
carry the same vocab. Then llama-imatrix over the calibration text
(the demo corpus's calibration split, the text `infq quantize` calibrates the demo model on,
written to calib.txt joined as infq joins it; --calib-chunks chunks of 512 tokens, infq's default
128 x 512 tokens); llama-quantize to each type with and without that imatrix (wall time of each
encode); llama-perplexity (ctx 512) on each eval text: WikiText-2 test (/work/shared/data) and the
demo corpus's evaluation split (demo_eval.txt); then `infq eval --protocol llamacpp` on llama.cpp's
files of the `--crosscheck` types (does infq score llama.cpp's file as llama.cpp does?). Part `infq`:
`infq quantize --method kquant --type T` with llama.cpp's imatrix file (the same imatrix data) and
with --no-imatrix, llama-perplexity on infq's file, and infq eval too for the `--crosscheck` types. Sizes are file bytes; bpw is
llama.cpp's (tensor bytes x 8 / parameters, from `infq inspect`). --chunks limits every perplexity
run to its first N chunks (0 = all: 1013 for WikiText-2). Rows of the part not run are kept from
the existing results file. Writes bench/results/gguf_llamacpp.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import RESULTS, infq, write

WIKI = Path("/work/shared/data/wikitext-2-raw/wiki.test.raw")
TYPES = "Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K"
OUT = RESULTS / "gguf_llamacpp.json"


def run(cmd: list[Any], timeout: float = 3600) -> tuple[str, float]:
    """Run a command niced; (combined output, wall seconds); raise with the log tail on failure."""
    start = time.perf_counter()
    p = subprocess.run(["nice", "-n", "10", *map(str, cmd)], capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}): {(p.stdout + p.stderr)[-2000:]}")
    return p.stdout + p.stderr, round(wall, 3)


def llama_ppl(bin_dir: Path, model: Path, text: Path, chunks: int, threads: int) -> dict[str, Any]:
    cmd = [bin_dir / "llama-perplexity", "-m", model, "-f", text, "-c", 512, "-t", threads]
    for _ in range(2):  # a run has once ended (exit 0) before printing its final line: run it again
        log, wall = run(cmd + (["--chunks", chunks] if chunks else []))
        m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
        if m is not None:
            break
    n = re.search(r"calculating perplexity over (\d+) chunks", log)
    if m is None:
        raise RuntimeError(f"no perplexity in llama-perplexity's output: {log[-1500:]}")
    return {"ppl": float(m.group(1)), "stderr": float(m.group(2)), "chunks": int(n.group(1)) if n else None,
            "wall_s": wall}


def infq_ppl(model: Path, text: Path, chunks: int) -> dict[str, Any]:
    r = infq("eval", model, "--ppl", text, "--protocol", "llamacpp", *(["--limit", chunks] if chunks else []))
    return {"ppl": r["ppl"], "stderr": r["stderr"], "chunks": r["windows"], "wall_s": r["wall_s"]}


def size_row(model: Path) -> dict[str, Any]:
    info = infq("inspect", model, "--summary")
    return {"bytes": model.stat().st_size, "bpw": round(info["bits_per_weight"], 4),
            "tensor_types": info["quantization"]["types"]}


def texts(work: Path, names: list[str]) -> dict[str, Path]:
    """Eval texts by name; the demo split is written as infq joins it (records joined by blank lines)."""
    out = {}
    for name in names:
        if name == "wikitext2":
            out[name] = WIKI
        elif name == "demo":
            from infq.eval.datasets import load_text

            path = work / "demo_eval.txt"
            path.write_text(load_text("demo", "eval"))
            out[name] = path
        else:
            out[name] = Path(name)
    return out


def evals(bin_dir: Path, model: Path, eval_texts: dict[str, Path], args: argparse.Namespace, infq_too: bool) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for name, text in eval_texts.items():
        res[name] = {"llama_perplexity": llama_ppl(bin_dir, model, text, args.chunks, args.threads)}
        if infq_too:
            res[name]["infq_eval"] = infq_ppl(model, text, args.chunks)
        print(f"  {model.name} {name}: " + ", ".join(f"{k} {v['ppl']:.4f}" for k, v in res[name].items()), flush=True)
    return res


def part_llamacpp(root: Path, work: Path, eval_texts: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    from infq.eval.datasets import load_text
    from infq.formats.hf import demo_model_path

    bin_dir = root / "build" / "bin"
    converted = work / "lc-convert-F16.gguf"
    _, convert_s = run([root / "convert_hf_to_gguf.sh", demo_model_path(), "--outfile", converted, "--outtype", "f16"])
    f16 = work / "infq-F16.gguf"  # llama-quantize's input, see the module docstring
    infq("convert", "demo", "--to", "gguf", "--type", "F16", "--out", f16, "--force")
    calib = work / "calib.txt"
    calib.write_text(load_text("demo", "calib"))
    imatrix = work / "lc-imatrix.gguf"
    _, imatrix_s = run([bin_dir / "llama-imatrix", "-m", f16, "-f", calib, "-o", imatrix, "-c", 512,
                        "--chunks", args.calib_chunks, "-t", args.threads, "--no-ppl"])
    rows = [{"tool": "llama.cpp convert_hf_to_gguf.py", "type": "F16", "imatrix": False, "encode_s": convert_s,
             **size_row(converted), "eval": evals(bin_dir, converted, eval_texts, args, infq_too=True)},
            {"tool": "infq convert (llama-quantize input)", "type": "F16", "imatrix": False, **size_row(f16),
             "eval": evals(bin_dir, f16, eval_texts, args, infq_too=True)}]
    for t in args.types:
        for with_im in (False, True):
            out = work / f"lc-{t}{'-imat' if with_im else ''}.gguf"
            cmd = [bin_dir / "llama-quantize", *(["--imatrix", imatrix] if with_im else []), f16, out, t, args.threads]
            log, wall = run(cmd)
            m = re.search(r"quantize time =\s*([0-9.]+) ms", log)
            rows.append({"tool": "llama.cpp", "type": t, "imatrix": with_im, "encode_s": wall,
                         "quantize_time_s": float(m.group(1)) / 1000 if m else None, **size_row(out),
                         "eval": evals(bin_dir, out, eval_texts, args, infq_too=t in args.crosscheck)})
            print(f"llama.cpp {t} imatrix={with_im}: {rows[-1]['bytes']} bytes, {rows[-1]['bpw']} bpw, "
                  f"{wall:.2f} s", flush=True)
    return {"rows": rows, "imatrix": {"file": str(imatrix), "calib_text": "demo corpus calibration split",
                                      "chunks": args.calib_chunks, "ctx": 512, "wall_s": imatrix_s}}


def part_infq(root: Path, work: Path, eval_texts: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    bin_dir = root / "build" / "bin"
    imatrix = work / "lc-imatrix.gguf"
    if not imatrix.is_file():
        raise SystemExit(f"{imatrix} is missing: run --only llamacpp first (same --work) for llama.cpp's imatrix")
    rows = []
    for t in args.types:
        for with_im in (False, True):
            out = work / f"infq-{t}{'-imat' if with_im else ''}.gguf"
            flags = ["--imatrix", imatrix] if with_im else ["--no-imatrix"]
            q = infq("quantize", "--method", "kquant", "--type", t, *flags, "--out", out, "--force")
            rows.append({"tool": "infq", "type": t, "imatrix": with_im, "encode_s": q["wall_s"],
                         "quantize_seconds": q["seconds"], "encode_seconds": q.get("encode_seconds"), **size_row(out),
                         "eval": evals(bin_dir, out, eval_texts, args, infq_too=t in args.crosscheck)})
            print(f"infq {t} imatrix={with_im}: {rows[-1]['bytes']} bytes, {rows[-1]['bpw']} bpw, "
                  f"{q['wall_s']:.2f} s", flush=True)
    return {"rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="all", choices=("all", "llamacpp", "infq"))
    p.add_argument("--types", default=TYPES)
    p.add_argument("--crosscheck", default="F16,Q8_0,Q4_K_M,Q2_K",
                   help="types whose files (llama.cpp's and infq's) infq eval scores too (the 'same perplexity?' check)")
    p.add_argument("--chunks", type=int, default=0, help="perplexity chunks per run (0 = all)")
    p.add_argument("--calib-chunks", type=int, default=128)
    p.add_argument("--eval", default="wikitext2,demo")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/infq-bench-gguf")
    p.add_argument("--llamacpp", default="/work/peers/llamacpp")
    args = p.parse_args()
    args.types = args.types.split(",")
    args.crosscheck = args.crosscheck.split(",")
    root, work = Path(args.llamacpp), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (root / "build" / "bin" / "llama-quantize").is_file():
        sys.exit(f"no llama.cpp build under {root}; see /work/peers/llamacpp/READY")
    eval_texts = texts(work, args.eval.split(","))
    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    payload: dict[str, Any] = {k: old.get(k) for k in ("llamacpp", "infq") if old.get(k)}
    ready = (root / "READY").read_text() if (root / "READY").is_file() else ""
    settings = {"chunks": args.chunks or "all", "ctx": 512, "threads": args.threads, "eval": args.eval,
                           "types": args.types, "llamacpp_build": ready.strip().splitlines()[:3],
                           "command": " ".join(["python", "bench/gguf_llamacpp.py", *sys.argv[1:]])}
    if args.only in ("all", "llamacpp"):
        payload["llamacpp"] = {"settings": settings, **part_llamacpp(root, work, eval_texts, args)}
        write("gguf_llamacpp.json", payload)
    if args.only in ("all", "infq"):
        payload["infq"] = {"settings": settings, **part_infq(root, work, eval_texts, args)}
    print(write("gguf_llamacpp.json", payload))


if __name__ == "__main__":
    main()
