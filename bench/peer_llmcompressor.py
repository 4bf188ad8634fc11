"""GPTQ and AWQ on the demo model: infq vs llm-compressor, same calibration windows, same settings.

Usage: python bench/peer_llmcompressor.py --peer-python /path/to/llmc-venv/bin/python
           [--bits 4 3] [--methods gptq awq] [--seed 0] [--dtype float32|auto] [--shared-machine]

llm-compressor (0.14.0.1, with compressed-tensors 0.19.0) lives in its own virtual environment
(see ../shared/reference/peers.md: install it with a constraint `torch==2.13.0+cpu`). On a CPU its
AWQ calls `IntermediatesCache.pin_memory`, which needs an accelerator; the peer code here makes it a
no-op when CUDA is absent. Setup used (outside the repo):
    echo 'torch==2.13.0+cpu' > c.txt && python3 -m venv /work/peers/llmc
    /work/peers/llmc/bin/pip install -c c.txt torch==2.13.0+cpu llmcompressor==0.14.0.1 compressed-tensors==0.19.0
Cost on the 2-core CPU: GPTQ ~40 s per run in float32 (the fp16 checkpoint dtype, `--dtype auto`,
is ~4x slower on CPU), AWQ ~10-30 min per run (its scale grid search re-runs each attention / MLP
20 times over all 128 windows), each peer scoring pass (607 windows) 1-4 min.

What it does:
  * draws the calibration windows once with infq (demo corpus, 128 x 512 tokens, `--seed`) and
    hands the same token ids to llm-compressor's `oneshot` (a tokenized `datasets.Dataset`, no
    shuffling) and to `infq quantize` (which draws the identical windows from the same seed);
  * dumps the evaluation token ids exactly as `infq eval demo --ppl demo --seqlen 512` forms them
    (`infq.eval.datasets.eval_tokens`; 607 non-overlapping 512-token windows, GPTQ protocol) and
    scores every llm-compressor output in the peer venv with transformers' own forward in fp32
    (the compressed-tensors checkpoint decompressed by transformers' loader). The scorer is checked
    on the unquantized demo model against `infq eval demo` (must agree to ~0.01);
  * GPTQ: llm-compressor GPTQModifier (int, sym, group 128, actorder None, dampening_frac 0.01,
    block 128) vs `infq quantize --method gptq`, scored by `infq eval`;
  * AWQ: llm-compressor AWQModifier + QuantizationModifier (int, asym, group 128: W4A16_ASYM and
    its 3-bit analogue) vs `infq quantize --method awq --asym` (3-bit: `--format gptq`, as the
    AWQ GEMM layout is 4-bit only) when infq has it (else the error is recorded as a note);
  * each quantization runs in its own process (time and peak RSS are its own);
  * optionally (`--cross-limit N`, default 20) also asks `infq eval` to read each llm-compressor
    output on the first N windows, next to the peer scorer's figure on the same windows.
Writes bench/results/peer_llmcompressor.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from common import RESULTS, infq, write

# Runs in the peer venv. argv[1] is a JSON config; the last stdout line is a JSON result.
PEER = r"""
import json, math, os, resource, sys, time
cfg = json.loads(sys.argv[1])
import torch

def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

if cfg["op"] == "score":  # GPTQ-protocol perplexity with transformers' forward in fp32
    from transformers import AutoModelForCausalLM
    kw = {}
    if cfg.get("compressed"):
        from transformers import CompressedTensorsConfig
        kw["quantization_config"] = CompressedTensorsConfig(run_compressed=False)  # decompress
    model = AutoModelForCausalLM.from_pretrained(cfg["load"], dtype=torch.float32, **kw).eval()
    model.float()
    tokens = torch.tensor(json.load(open(cfg["tokens"])), dtype=torch.long)
    S = cfg["seqlen"]
    n = tokens.numel() // S
    nll, prefix = 0.0, None
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(n):
            ids = tokens[i * S:(i + 1) * S][None]
            logits = model(ids).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).double()) * S
            if i + 1 == cfg.get("prefix"):
                prefix = math.exp(nll / ((i + 1) * S))
    print(json.dumps({"ppl": math.exp(nll / (n * S)), "windows": n, "prefix_ppl": prefix,
                      "prefix_windows": cfg.get("prefix"), "seconds": time.perf_counter() - start}))
    sys.exit(0)

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
from llmcompressor.pipelines.cache import IntermediatesCache
import llmcompressor, compressed_tensors
if not torch.cuda.is_available():  # AWQ pins its cached activations: needs an accelerator
    IntermediatesCache.pin_memory = lambda self, *a, **k: None

windows = json.load(open(cfg["windows"]))
data = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
weights = {"num_bits": cfg["bits"], "type": "int", "symmetric": cfg["sym"], "strategy": "group",
           "group_size": cfg["group_size"]}
if cfg["method"] == "gptq":
    weights["actorder"] = None
groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
if cfg["method"] == "gptq":
    recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"], actorder=None,
                           dampening_frac=cfg["damp"], block_size=128)]
else:
    recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
start = time.perf_counter()
dtype = "auto" if cfg["dtype"] == "auto" else getattr(torch, cfg["dtype"])
model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=dtype)
tok = AutoTokenizer.from_pretrained(cfg["model"])
model = oneshot(model=model, processor=tok, recipe=recipe, dataset=data,
                num_calibration_samples=len(windows), max_seq_length=len(windows[0]),
                shuffle_calibration_samples=False, batch_size=1)
model.save_pretrained(cfg["out"], save_compressed=True)
tok.save_pretrained(cfg["out"])
seconds = time.perf_counter() - start
qc = json.load(open(os.path.join(cfg["out"], "config.json"))).get("quantization_config", {})
size = sum(os.path.getsize(os.path.join(cfg["out"], f)) for f in os.listdir(cfg["out"])
           if f.endswith(".safetensors"))
print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak_rss(), "calib_dtype": str(model.dtype),
                  "file_bytes": size,
                  "format": qc.get("format"), "llmcompressor": llmcompressor.__version__,
                  "compressed_tensors": compressed_tensors.__version__,
                  "recipe": [type(m).__name__ for m in recipe], "weights": weights}))
"""


def infq_source() -> dict[str, object]:
    """The infq commit the figures came from, and uncommitted files under infq/ (if any)."""
    root = Path(__file__).resolve().parent.parent

    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "infq").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "uncommitted": dirty}


def peer(python: str, cfg: dict[str, Any], timeout: float = 7200) -> dict[str, Any]:
    """Run the peer code with `cfg` in the peer venv; its JSON result (wall_s added)."""
    t0 = time.perf_counter()
    env = {**os.environ, "TQDM_DISABLE": "1"}  # progress bars would flood the captured stderr
    out = subprocess.run([python, "-c", PEER, json.dumps(cfg)], capture_output=True, text=True,
                         timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"peer {cfg.get('op')} {cfg.get('method', '')} failed ({out.returncode}):"
                           f" {out.stderr.strip()[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    return result


def try_infq(*args: Any) -> dict[str, Any]:
    """`infq ARGS --json`, or {"error": ...} when it fails (e.g. a method not available yet)."""
    try:
        return infq(*map(str, args))
    except RuntimeError as exc:
        return {"error": str(exc)[-800:]}


def run_row(args: argparse.Namespace, method: str, bits: int, sym: bool, model: Path, work: Path,
            score: dict[str, Any]) -> dict[str, Any]:
    """One (method, bits): llm-compressor quantize + score, then infq quantize + eval."""
    row: dict[str, Any] = {"method": method, "bits": bits, "group_size": args.group_size,
                           "sym": sym, "infq_source": infq_source()}
    out = work / f"llmc-{method}-w{bits}"
    cfg = {"op": "quantize", "method": method, "model": str(model), "bits": bits,
           "group_size": args.group_size, "sym": sym, "damp": args.damp, "dtype": args.dtype,
           "windows": str(work / "windows.json"), "out": str(out)}
    try:
        q = peer(args.peer_python, cfg)
        s = peer(args.peer_python, {**score, "load": str(out), "compressed": True})
        row["llmcompressor"] = {
            "ppl": s["ppl"], "quantize_s": q["seconds"], "process_wall_s": q["wall_s"],
            "peak_rss_bytes": q["peak_rss_bytes"], "calib_dtype": q["calib_dtype"],
            "format": q["format"], "file_bytes": q["file_bytes"], "recipe": q["recipe"],
            "weights": q["weights"], "loadavg_after": os.getloadavg(),
            "scored_by": "transformers fp32 forward (peer venv)",
        }
        if args.cross_limit:
            cross = try_infq("eval", out, "--ppl", "demo", "--seqlen", args.seqlen,
                             "--limit", args.cross_limit)
            row["cross_load"] = {"windows": args.cross_limit, "peer_scorer_ppl": s["prefix_ppl"],
                                 "infq_reading_peer_checkpoint_ppl": cross.get("ppl"),
                                 "error": cross.get("error")}
    except RuntimeError as exc:  # e.g. a bit width the peer refuses
        row["llmcompressor"] = {"error": str(exc)[-1500:]}
    ours_out = work / f"infq-{method}-w{bits}"
    qargs = ["quantize", "--method", method, "--bits", bits, "--group-size", args.group_size,
             "--sym" if sym else "--asym", "--dataset", "demo", "--nsamples", args.nsamples,
             "--seqlen", args.seqlen, "--seed", args.seed, "--out", ours_out, "--force"]
    if method == "gptq":
        qargs += ["--damp", args.damp]
    elif bits != 4:  # infq's AWQ GEMM layout is 4-bit only; other widths go out as GPTQ
        qargs += ["--format", "gptq"]
    ours = try_infq(*qargs)
    if "error" in ours:
        row["infq"] = {"error": ours["error"],
                       "note": f"infq quantize --method {method} --bits {bits} did not run"}
    else:
        ev = try_infq("eval", ours_out, "--ppl", "demo", "--seqlen", args.seqlen)
        row["infq"] = {"ppl": ev.get("ppl"), "eval_error": ev.get("error"),
                       "quantize_s": ours["seconds"], "process_wall_s": ours["wall_s"],
                       "peak_rss_bytes": ours.get("peak_rss_bytes"), "format": ours.get("format"),
                       "file_bytes": ours.get("bytes_after"), "loadavg_after": os.getloadavg(),
                       "scored_by": "infq eval (fp32 on CPU)"}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-python", required=True, help="python of the llm-compressor venv")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--methods", nargs="+", default=["gptq", "awq"], choices=["gptq", "awq"])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (both tools)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening fraction")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype llm-compressor loads the model in for calibration (default float32,"
                        " as infq calibrates; auto = the checkpoint's fp16, ~4x slower on CPU)")
    p.add_argument("--cross-limit", type=int, default=20,
                   help="windows on which infq eval reads the peer's outputs (0: skip)")
    p.add_argument("--shared-machine", action="store_true",
                   help="note in the JSON that other jobs loaded the CPU during the timings")
    p.add_argument("--work", default=None, help="scratch folder (default: a new temp dir)")
    p.add_argument("--out", default="peer_llmcompressor.json", help="file name under bench/results")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished rows of an earlier run with the same settings (the JSON"
                        " is rewritten after every row)")
    args = p.parse_args()

    from infq.eval.datasets import calibration_windows, eval_tokens
    from infq.formats.hf import demo_model_path, load_tokenizer

    model = demo_model_path()
    work = Path(args.work or tempfile.mkdtemp(prefix="infq-llmc-"))
    work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(model)
    windows = calibration_windows(tok, "demo", args.nsamples, args.seqlen, seed=args.seed)
    (work / "windows.json").write_text(json.dumps(windows.tolist()))
    tokens = eval_tokens(tok, "demo", seqlen=args.seqlen)  # what `infq eval --ppl demo` scores
    (work / "tokens.json").write_text(json.dumps(tokens.tolist()))
    score = {"op": "score", "tokens": str(work / "tokens.json"), "seqlen": args.seqlen,
             "prefix": args.cross_limit or None}

    calibration = {"dataset": "demo", "nsamples": args.nsamples, "seqlen": args.seqlen,
                   "seed": args.seed, "peer_calib_dtype": args.dtype, "group_size": args.group_size,
                   "damp": args.damp}
    done: dict[tuple[str, int], dict[str, Any]] = {}
    previous = json.loads((RESULTS / args.out).read_text()) if (RESULTS / args.out).exists() else None
    if args.resume and previous and previous.get("calibration") == calibration:
        fp = {"ppl": previous["fp_ppl"], "windows": previous["eval"]["windows"]}
        fp_peer = {"ppl": previous["fp_ppl_peer_scorer"]}
        done = {(r["method"], r["bits"]): r for r in previous["rows"]
                if r["infq"].get("ppl") is not None
                and ("ppl" in r["llmcompressor"] or "error" in r["llmcompressor"])}
        print(f"resuming: {len(done)} finished rows kept from {RESULTS / args.out}", flush=True)
    else:
        fp = infq("eval", "demo", "--ppl", "demo", "--seqlen", args.seqlen)
        fp_peer = peer(args.peer_python, {**score, "load": str(model)})
    print(json.dumps({"fp_infq": fp["ppl"], "fp_peer_scorer": fp_peer["ppl"]}), flush=True)
    if abs(fp_peer["ppl"] - fp["ppl"]) > 0.01:
        raise SystemExit(f"peer scorer disagrees with infq on the fp16 model: {fp_peer['ppl']} vs {fp['ppl']}")

    def save(rows: list[dict[str, Any]], complete: bool) -> Path:
        return write(args.out, {
            "complete": complete,
            "infq_source": infq_source(),
            "fp_ppl": fp["ppl"], "fp_ppl_peer_scorer": fp_peer["ppl"],
            "eval": {"dataset": "demo", "protocol": "gptq", "seqlen": args.seqlen, "windows": fp["windows"]},
            "calibration": calibration,
            "peer": "llm-compressor 0.14.0.1 + compressed-tensors 0.19.0",
            "timing_note": ("taken on a shared 2-core machine (other jobs running): times are inflated"
                            " and noisy" if args.shared_machine else "machine not known to be shared"),
            "rows": rows,
        })

    rows: list[dict[str, Any]] = []
    for method in args.methods:
        sym = method == "gptq"  # llm-compressor's presets: W4A16 (sym) for GPTQ, W4A16_ASYM for AWQ
        for bits in args.bits:
            if (method, bits) in done:
                rows.append(done[(method, bits)])
                continue
            rows.append(run_row(args, method, bits, sym, model, work, score))
            print(json.dumps(rows[-1]), flush=True)
            save(rows, complete=False)  # a killed run keeps its finished rows (see --resume)
    path = save(rows, complete=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
