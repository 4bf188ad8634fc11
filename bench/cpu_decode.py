"""CPU decode speed at batch 1: infq fp32 / bf16 / int8 / int4 vs HF transformers and llama.cpp.

Usage: python bench/cpu_decode.py [--layers 22] [--tokens 128] [--threads 2] [--models demo,random] [--rounds 1]
                                  [--variants fp32,bf16,int8,int4-g128,int4-g32,int4-g128-head]

Two models: the bundled demo model and a random-weight Llama in TinyLlama-1.1B's shape (built in a
temporary directory as bench/quantize_memory.py does; `--layers` shrinks it for a quick check).
Quantized variants are written by `infq quantize --method rtn` (int8: 8-bit per channel; int4: 4-bit
groups of 128 or 32, symmetric; "-head" also quantizes lm_head, as llama.cpp's Q4_K_M stores its
output matrix in 6 bits). Each row runs in its own process (its own peak RSS): the model loaded by
`runtime.loader.load_model` (fp32 rows in float32, the others in bfloat16, where the CPU kernels of
`kernels.dispatch` run), a short warm-up, then greedy decoding of `--tokens` tokens after an 8-token
prompt, timed two ways: the serving engine (`runtime.engine.Engine`, paged KV cache, one request;
what `infq run` uses) and a plain loop over `DecoderModel.forward` with the contiguous `LayerCache`.
HF transformers' `generate` runs the same fp32 (and bf16) model in the same run: its decode rate is
(N - 1) / (t(N) - t(1)). llama.cpp (if /work/peers/llamacpp/READY exists): its convert_hf_to_gguf.py
to f16, llama-quantize to Q8_0 and Q4_K_M, and `llama-bench -p 0 -n TOKENS -t THREADS`.
The int4 row of the large model is also profiled (torch.profiler, self CPU time per op per token).
Writes bench/results/cpu_decode.json (or `--out NAME`) and prints a summary. Timings only mean something on an idle
machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import infq, write

LLAMACPP = Path("/work/peers/llamacpp")
PROMPT = [1, 415, 2936, 3060, 285, 1142, 3305, 754]  # 8 token ids < 4096 (the demo vocabulary)
VARIANTS = {  # name -> (infq quantize arguments or None for the original checkpoint, runtime dtype)
    "fp32": (None, "float32"),
    "bf16": (None, "bfloat16"),
    "int8": (["--bits", "8", "--group-size", "-1"], "bfloat16"),
    "int4-g128": (["--bits", "4", "--group-size", "128"], "bfloat16"),
    "int4-g32": (["--bits", "4", "--group-size", "32"], "bfloat16"),
    "int4-g128-head": (["--bits", "4", "--group-size", "128", "--lm-head"], "bfloat16"),
}


# ------------------------------------------------------------------ one measurement (own process)

def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_infq(path: str, dtype: str, tokens: int, profile: bool) -> dict:
    import torch

    from infq.runtime.engine import Engine, EngineConfig
    from infq.runtime.loader import load_model
    from infq.runtime.sampling import SamplingParams

    t0 = time.perf_counter()
    model = load_model(path, dtype=dtype, tokenizer=False, serving=True).model  # as `infq run` loads it
    load_s = time.perf_counter() - t0
    kernels = sorted({getattr(lin, "impl", type(lin).__name__) for b in model.blocks
                      for lin in [*b.linears.values(), *b.fused.values()]})
    head = getattr(model.lm_head, "impl", type(model.lm_head).__name__) if model.lm_head is not None else "tied"
    ids = torch.tensor([PROMPT])  # (1, 8)

    def loop(n: int) -> float:
        cache = model.new_cache()
        logits = model(ids, cache)[:, -1]  # (1, V)
        start = time.perf_counter()
        for _ in range(n):
            tok = logits.argmax(-1, keepdim=True)  # (1, 1)
            logits = model(tok, cache)[:, -1]
        return n / (time.perf_counter() - start)

    engine = Engine(model, EngineConfig(max_num_seqs=1, kv_memory=64 << 20))
    greedy = SamplingParams(temperature=0.0)

    def engine_rate(n: int) -> float:
        return engine.generate([PROMPT], greedy, max_tokens=n + 1, ignore_eos=True)[0].tokens_per_s

    loop(4), engine_rate(4)  # warm-up
    row = {"load_s": round(load_s, 2), "kernels": kernels, "lm_head": head,
           "engine_tok_s": round(engine_rate(tokens), 2), "loop_tok_s": round(loop(tokens), 2)}
    if profile:
        row["profile"] = profile_decode(model, ids, 16)
    row["peak_rss_bytes"] = _peak_rss()
    return row


def profile_decode(model, ids, steps: int) -> list[dict]:
    """Self CPU time per op per decoded token (loop over forward), the top 12."""
    from torch.profiler import ProfilerActivity, profile

    cache = model.new_cache()
    logits = model(ids, cache)[:, -1]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            logits = model(logits.argmax(-1, keepdim=True), cache)[:, -1]
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "ms_per_token": round(e.self_cpu_time_total / 1e3 / steps, 3),
             "share": round(e.self_cpu_time_total / total, 3), "calls_per_token": e.count // steps}
            for e in events[:12]]


def measure_hf(path: str, dtype: str, tokens: int) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor([PROMPT])

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    run(4)  # warm-up
    t1, tn = run(1), run(tokens)
    return {"tok_s": round((tokens - 1) / (tn - t1), 2), "peak_rss_bytes": _peak_rss()}


def one(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["kind"] == "hf":
        return measure_hf(spec["path"], spec["dtype"], spec["tokens"])
    return measure_infq(spec["path"], spec["dtype"], spec["tokens"], spec.get("profile", False))


def run_one(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--one", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-1500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ llama.cpp

def llamacpp_prepare(model: Path, work: Path, threads: int) -> list[tuple[str, Path]]:
    """convert_hf_to_gguf.py to f16, then llama-quantize to Q8_0 and Q4_K_M: [(qtype, gguf path)]."""
    if not (LLAMACPP / "READY").exists():
        return []
    bin_dir = LLAMACPP / "build" / "bin"
    f16 = work / f"{model.name}-f16.gguf"
    subprocess.run([str(LLAMACPP / "convert_hf_to_gguf.sh"), str(model), "--outfile", str(f16), "--outtype", "f16"],
                   check=True, capture_output=True)
    out = []
    for qtype in ("Q8_0", "Q4_K_M"):
        gguf = work / f"{model.name}-{qtype}.gguf"
        subprocess.run([str(bin_dir / "llama-quantize"), str(f16), str(gguf), qtype, str(threads)],
                       check=True, capture_output=True)
        out.append((qtype, gguf))
    f16.unlink()
    return out


def llamacpp_bench(gguf: Path, tokens: int, threads: int) -> dict:
    out = subprocess.run([str(LLAMACPP / "build" / "bin" / "llama-bench"), "-m", str(gguf), "-p", "0",
                          "-n", str(tokens), "-t", str(threads), "-r", "3", "-o", "json"],
                         check=True, capture_output=True, text=True)
    res = json.loads(out.stdout)[0]
    return {"tok_s": round(res["avg_ts"], 2), "stddev_tok_s": round(res["stddev_ts"], 2),
            "model_bytes": res["model_size"], "build": res["build_commit"]}


# ------------------------------------------------------------------ orchestration

def pad_vocab(path: Path, size: int) -> None:
    """Give the copied demo tokenizer (4096 BPE tokens) `size` entries, unused ones `<extra_i>`, so
    that llama.cpp's converter writes as many tokens as the embedding has rows."""
    tok = json.loads((path / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    for i in range(len(vocab), size):
        vocab[f"<extra_{i}>"] = i
    (path / "tokenizer.json").write_text(json.dumps(tok))


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return round((xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2, 2)


def _merge(results: list[dict], keys: tuple[str, ...]) -> dict:
    """One row from a measurement repeated over rounds: the median of each rate, every round's value."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[-1]
    row = dict(ok[-1])
    for k in keys:
        if k in row:
            row[k] = _median([r[k] for r in ok])
            row[f"{k}_rounds"] = [r[k] for r in results if k in r]
    return row


def bench_model(name: str, path: Path, work: Path, args: argparse.Namespace) -> list[dict]:
    """Prepare every variant first, then run them all once per round, interleaved, so that a slow
    spell of a shared machine hits every variant alike; report each rate's median over the rounds."""
    base = {"threads": args.threads, "tokens": args.tokens}
    entries = []  # (label, kind, spec or gguf path)
    for variant in args.variants.split(","):
        qargs, dtype = VARIANTS[variant]
        model = path
        if qargs is not None:
            model = work / f"{name}-{variant}"
            infq("quantize", "--model", path, "--method", "rtn", *qargs, "--out", model, "--force", timeout=7200)
        entries.append((f"infq {variant}", "run", {**base, "kind": "infq", "path": str(model), "dtype": dtype}))
    if not args.skip_hf:
        for dtype in ("float32", "bfloat16"):
            entries.append((f"transformers {dtype}", "run", {**base, "kind": "hf", "path": str(path), "dtype": dtype}))
    if not args.skip_llamacpp:
        for qtype, gguf in llamacpp_prepare(path, work, args.threads):
            entries.append((f"llama.cpp {qtype}", "llamacpp", gguf))
    measured: dict[str, list[dict]] = {label: [] for label, _, _ in entries}
    for r in range(args.rounds):
        for label, kind, spec in entries:
            if kind == "llamacpp":
                res = llamacpp_bench(spec, args.tokens, args.threads)
            else:  # profile the large model's int4 row once, in the last round
                profile = name != "demo" and label == "infq int4-g128" and r == args.rounds - 1
                res = run_one({**spec, "profile": profile})
            measured[label].append(res)
            print(f"  [{r + 1}/{args.rounds}] {name} {label:26s} {_rate(res)}", flush=True)
    rows = []
    for label, kind, spec in entries:
        row = {"variant": label, **_merge(measured[label], ("engine_tok_s", "loop_tok_s", "tok_s"))}
        if kind == "run":
            row = {"variant": label, "dtype": spec["dtype"], **{k: v for k, v in row.items() if k != "variant"}}
        rows.append(row)
    for _, kind, spec in entries:
        if kind == "llamacpp":
            spec.unlink()
        elif spec["path"] != str(path):
            shutil.rmtree(spec["path"], ignore_errors=True)
    return rows


def _rate(res: dict) -> str:
    if "error" in res:
        return "error: " + res["error"].splitlines()[-1]
    if "engine_tok_s" not in res:
        return f"{res['tok_s']:8.2f} tok/s"
    return f"engine {res['engine_tok_s']:8.2f} tok/s, loop {res['loop_tok_s']:8.2f} tok/s ({', '.join(res['kernels'])})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default="demo,random")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=1,
                   help="run every variant this many times, interleaved; report medians")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-llamacpp", action="store_true")
    p.add_argument("--out", default="cpu_decode.json", help="results file name under bench/results/")
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    from quantize_memory import build

    from infq.formats.hf import demo_model_path

    work = Path(tempfile.mkdtemp(prefix="infq-decode-"))
    results = {}
    try:
        for name in args.models.split(","):
            path = demo_model_path()
            params = None
            if name == "random":
                path = work / "random-1b"
                params = build(path, args.layers, 2048, 5632, 32, 4, 32000)
                pad_vocab(path, 32000)
            print(f"{name}: {path}", flush=True)
            results[name] = {"parameters": params, "rows": bench_model(name, path, work, args)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = write(args.out, {
        "setup": {"batch": 1, "prompt_tokens": len(PROMPT), "decode_tokens": args.tokens, "threads": args.threads,
                  "rounds": args.rounds,
                  "random_model": {"shape": "TinyLlama-1.1B", "layers": args.layers}, "quantizer": "infq rtn",
                  "note": "timings from a machine shared with other jobs are indicative only"},
        "models": results,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
