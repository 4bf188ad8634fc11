"""GGML encode speed: infq's block encoders vs llama.cpp's llama-quantize on the demo model.

For every mix (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, Q3_K_M, Q2_K) the demo model's tensors are planned
with `kquant_mix.plan_mix` (the per-tensor types the pipeline would write) and encoded in process
with `kquants.quantize`, without and with an importance matrix (a synthetic one: exp(2 N(0,1)) per
input channel of every matmul weight, written in llama.cpp's format so llama-quantize gets the same
one; the encode cost does not depend on where it came from); the time is the encode of every
tensor (F32/F16 tensors cost nothing), best of `--repeats`. In the same run llama-quantize
converts the demo model's f16 GGUF (made with llama.cpp's convert script if missing) to the same
mix, with and without that imatrix, wall time best of `--repeats` (its "quantize time" line kept). Both run
with the same thread count (`--threads`, default 1 and 2: the machine is shared, so one thread is
the steadier comparison). The ratio infq / llama-quantize is what issue 6 bounds (target <= 5).
Also timed once per mix: the whole `infq quantize --method kquant --no-imatrix` command (fresh
process: imports, checkpoint, tokenizer metadata, encode, GGUF write).
Results: bench/results/kquant_encode.json.
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "infq" / "assets" / "demo"
LLAMACPP = Path("/work/peers/llamacpp")
MIXES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")


def demo_tensors() -> tuple[dict[str, torch.Tensor], Any]:
    """GGUF name -> float32 tensor of the demo model, and the mix's model shape."""
    from infq.formats.gguf import gguf_name
    from infq.formats.hf import Checkpoint, read_config
    from infq.quantizers.kquant_mix import ModelShape
    from infq.runtime.arch import ModelConfig

    cfg = ModelConfig.from_hf(read_config(DEMO))
    ckpt = Checkpoint(DEMO, mmap=True)
    tensors = {gguf_name(n): ckpt.get(n).to(torch.float32) for n in ckpt.keys() if not n.endswith("inv_freq")}
    return tensors, ModelShape(cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, has_output=cfg.arch.lm_head in ckpt)


def synthetic_imatrix(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """exp(2 N(0,1)) per input channel of every matmul weight (not token_embd, as llama-imatrix),
    written in llama.cpp's imatrix format for llama-quantize; -> the same means for infq."""
    from infq.formats.imatrix import Imatrix, write_imatrix

    g = torch.Generator().manual_seed(0)
    means = {n: torch.exp(2 * torch.randn(t.shape[1], generator=g)) for n, t in tensors.items()
             if t.dim() == 2 and n != "token_embd.weight"}
    write_imatrix(path, Imatrix.from_means(means, dict.fromkeys(means, 512), ["synthetic"], 1, 512))
    return means


def infq_encode(tensors: dict[str, torch.Tensor], model: Any, mix: str, means: dict[str, torch.Tensor] | None,
                repeats: int) -> dict[str, Any]:
    """Best-of wall time of encoding every tensor to its planned type (+ per-type split)."""
    from infq.quantizers import kquant_mix, kquants

    plan = kquant_mix.plan_mix(mix, {n: tuple(t.shape) for n, t in tensors.items()}, model, means is not None)
    types = plan.types()
    qws = {n: (means or {}).get(n) for n in tensors}
    best, best_cpu, split = float("inf"), float("inf"), {}
    for _ in range(repeats):
        per_type: dict[str, float] = {}
        start, cpu = time.perf_counter(), time.process_time()
        for n, t in tensors.items():
            qtype = types[n]
            if qtype in dict(kquant_mix.FLOAT_TYPES):
                continue
            t0 = time.perf_counter()
            kquants.quantize(t, qtype, qws[n])
            per_type[qtype] = per_type.get(qtype, 0.0) + time.perf_counter() - t0
        total = time.perf_counter() - start
        best_cpu = min(best_cpu, time.process_time() - cpu)
        if total < best:
            best, split = total, per_type
    return {"seconds": round(best, 4), "cpu_seconds": round(best_cpu, 4), "per_type_s": {k: round(v, 4) for k, v in sorted(split.items())},
            "weights": sum(t.numel() for n, t in tensors.items() if types[n] not in dict(kquant_mix.FLOAT_TYPES))}


def f16_gguf(path: Path) -> Path:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(LLAMACPP / "convert_hf_to_gguf.sh"), str(DEMO), "--outfile", str(path), "--outtype", "f16"],
                       check=True, capture_output=True)
    return path


def llama_quantize(f16: Path, mix: str, threads: int, repeats: int, work: Path, imatrix: Path | None
                   ) -> dict[str, Any]:
    best, best_cpu, reported = float("inf"), float("inf"), None
    for _ in range(repeats):
        start, cpu = time.perf_counter(), _children_cpu()
        p = subprocess.run([str(LLAMACPP / "build" / "bin" / "llama-quantize"),
                            *(["--imatrix", str(imatrix)] if imatrix else []), str(f16), str(work / f"lc-{mix}.gguf"),
                            mix, str(threads)], capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        best_cpu = min(best_cpu, _children_cpu() - cpu)
        m = re.search(r"quantize time =\s*([0-9.]+) ms", p.stdout + p.stderr)
        if wall < best:
            best, reported = wall, float(m.group(1)) / 1000 if m else None
    return {"wall_s": round(best, 4), "cpu_s": round(best_cpu, 4), "quantize_time_s": reported}


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def infq_cli(mix: str, threads: int, work: Path) -> dict[str, Any]:
    """The whole command, fresh process: wall time and the encode seconds it reports."""
    import json
    import os

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "infq", "quantize", "--model", str(DEMO), "--method", "kquant", "--type", mix, "--no-imatrix",
           "--out", str(work / f"infq-{mix}.gguf"), "--force", "--json"]
    start = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - start
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 3), "encode_seconds": out.get("encode_seconds"), "seconds": out.get("seconds")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mixes", nargs="+", default=list(MIXES))
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--f16", type=Path, default=Path("/tmp/lq/demo-f16.gguf"))
    ap.add_argument("--no-cli", action="store_true", help="skip the whole-command timings")
    args = ap.parse_args()
    tensors, model = demo_tensors()
    f16 = f16_gguf(args.f16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        means = synthetic_imatrix(tensors, work / "imatrix.dat")
        for threads in args.threads:
            torch.set_num_threads(threads)
            for mix in args.mixes:
                row: dict[str, Any] = {"mix": mix, "threads": threads}
                for imatrix in (False, True):
                    key = "imatrix" if imatrix else "plain"
                    lc = row[f"llama_quantize_{key}"] = llama_quantize(f16, mix, threads, args.repeats, work,
                                                                       work / "imatrix.dat" if imatrix else None)
                    enc = infq_encode(tensors, model, mix, means if imatrix else None, args.repeats)
                    key = "infq_imatrix" if imatrix else "infq"
                    row[key] = {**enc, "ratio_vs_llama_quantize": round(enc["seconds"] / lc["wall_s"], 2),
                                "cpu_ratio_vs_llama_quantize": round(enc["cpu_seconds"] / lc["cpu_s"], 2),
                                "mweights_per_s": round(enc["weights"] / enc["seconds"] / 1e6, 2)}
                if not args.no_cli:
                    row["infq_cli_no_imatrix"] = infq_cli(mix, threads, work)
                rows.append(row)
                a, b = row["infq"], row["infq_imatrix"]
                la, lb = row["llama_quantize_plain"], row["llama_quantize_imatrix"]
                print(f"threads={threads} {mix}: llama-quantize {la['wall_s']:.2f} s (cpu {la['cpu_s']:.2f}), infq "
                      f"{a['seconds']:.2f} s (x{a['ratio_vs_llama_quantize']}, cpu x{a['cpu_ratio_vs_llama_quantize']}); "
                      f"with imatrix {lb['wall_s']:.2f} s (cpu {lb['cpu_s']:.2f}) vs {b['seconds']:.2f} s "
                      f"(x{b['ratio_vs_llama_quantize']}, cpu x{b['cpu_ratio_vs_llama_quantize']})"
                      + (f", infq quantize wall {row['infq_cli_no_imatrix']['wall_s']:.1f} s" if not args.no_cli else ""),
                      flush=True)
    import subprocess as sp

    commit = sp.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    path = write("kquant_encode.json", {"commit": commit, "model": "infq/assets/demo", "llama_quantize_input": str(f16),
                                        "note": "llama-quantize wall time includes reading and writing its files; "
                                                "infq times are the encode only (in process), infq_cli the whole command; "
                                                "cpu: process CPU seconds (steadier than wall on a shared machine; "
                                                "with 2 threads CPU time adds both threads)",
                                        "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
