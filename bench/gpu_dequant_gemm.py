"""GPU benchmark of the Triton dequant-GEMM against PyTorch's fp16/bf16 matmul (cuBLAS).

Writes bench/results/gpu_dequant_gemm.json (device, versions, measured copy bandwidth, one row per
case). Shapes are (K -> N) = (in -> out): 4096 -> 4096, 4096 -> 14336 and 14336 -> 4096 (a Llama-3-8B
attention projection, the MLP up and down projections). For int4 g128 (GPTQ symmetric) every M in
1, 4, 16, 64, 256 is timed against `x @ W.T` in fp16 and in bf16; at M = 1 also int4 g128
asymmetric, int8 g128, FP8 e4m3 per-channel and GGUF Q4_K. Times are GPU times with a cold L2: a
CUDA graph calls the op once on each of several copies of the weight (more than 256 MB together, the
H200's L2 holds 60 MB), timed with CUDA events over 30 replays (median per call); the eager time of
one call (triton.testing.do_bench, L2 flushed) is reported beside it, as it includes Python launch
overhead. Bandwidth is (packed weight + x + y bytes) / time, as a fraction of a device-to-device copy
measured in the same run (bytes read + written / time). Every output is also checked against the
fp16 matmul of the dequantized weight (max |diff| / max |y|).

Usage: PYTHONPATH=. python bench/gpu_dequant_gemm.py [--out bench/results/gpu_dequant_gemm.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from infq.kernels import dequant_gemm as dg
from infq.quantizers.scheme import QuantizedTensor, QuantScheme

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (K, N)
MS = (1, 4, 16, 64, 256)


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB: (read + write bytes) / time, bytes/s."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=10, rep=100, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def int_weight(n: int, k: int, bits: int, gs: int, sym: bool, seed: int) -> QuantizedTensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    groups = k // gs
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, device="cuda", dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=g, device="cuda") * 2e-3 + 1e-4).half()
    zeros = (torch.full((n, groups), 1 << (bits - 1), device="cuda", dtype=torch.int32) if sym else
             torch.randint(0, 1 << bits, (n, groups), generator=g, device="cuda", dtype=torch.int32))
    g_idx = (torch.arange(k, device="cuda") // gs).to(torch.int32)
    return QuantizedTensor(codes, scales, zeros, g_idx, QuantScheme(bits, gs, sym), (n, k))


def fp8_weight(n: int, k: int, seed: int) -> QuantizedTensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    codes = (torch.randn(n, k, generator=g, device="cuda") * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scales = (torch.rand(n, 1, generator=g, device="cuda") * 1e-4 + 1e-5).half()
    return QuantizedTensor(codes, scales, None, torch.zeros(k, dtype=torch.int32, device="cuda"),
                           QuantScheme(8, -1, True, "fp8"), (n, k))


def q4k_weight(n: int, k: int, seed: int) -> QuantizedTensor:
    """Random Q4_K blocks (any byte is a valid code/scale) with small finite fp16 d and dmin."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks = torch.randint(0, 256, (n, k // 256, 144), generator=g, device="cuda", dtype=torch.uint8)
    d = (torch.rand(n, k // 256, 2, generator=g, device="cuda") * 1e-4 + 1e-5).half()
    blocks[..., 0:4] = d.view(torch.uint8)
    return QuantizedTensor.from_gguf(blocks.reshape(n, -1), "Q4_K", (n, k))


L2_FLUSH_BYTES = 256 << 20  # rotate through at least this much weight data per graph (H200 L2: 60 MB)


def eager_ms(fn) -> float:
    """do_bench: CUDA events around one eager call after an L2 flush (includes launch overhead
    whenever the Python launch takes longer than the flush)."""
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_ms(fns: list, reps: int = 30) -> float:
    """GPU time per call, cold L2: one CUDA graph calls every fn once (each on its own weight copy,
    together more than L2 holds), replayed `reps` times; median over replays / len(fns)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    del graph
    return sorted(times)[len(times) // 2]


def copies(t_bytes: int) -> int:
    return max(2, min(64, -(-L2_FLUSH_BYTES // t_bytes)))


def best_config(m: int) -> str:
    tuner = dg._gemv_tuned if m <= dg.GEMV_MAX_M else dg._gemm_tuned
    return str(getattr(tuner, "best_config", ""))


def run_case(scheme: str, qt: QuantizedTensor, k: int, n: int, ms: tuple[int, ...], copy_bw: float,
             rows: list[dict]) -> None:
    t0 = time.time()
    packed = dg.pack(qt)
    w16 = qt.dequantize(torch.float32).to("cuda", torch.float16)  # (N, K)
    wb16 = w16.bfloat16()
    r_q, r_16 = copies(packed.nbytes), copies(w16.numel() * 2)
    packs = [packed] + [dg.pack(qt) for _ in range(r_q - 1)]  # distinct copies: cold L2 per call
    w16s = [w16] + [w16.clone() for _ in range(r_16 - 1)]
    wb16s = [wb16] + [wb16.clone() for _ in range(r_16 - 1)]
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        xb = x.bfloat16()
        y = dg.dequant_gemm(x, packed).float()  # first call: autotuning
        cfg = best_config(m)
        y_ref = (x @ w16.T).float()
        rel = ((y - y_ref).abs().max() / y_ref.abs().max().clamp_min(1e-30)).item()
        t_q = graph_ms([lambda x=x, p=p: dg.dequant_gemm(x, p) for p in packs])
        t_16 = graph_ms([lambda x=x, w=w: x @ w.T for w in w16s])
        t_b16 = graph_ms([lambda xb=xb, w=w: xb @ w.T for w in wb16s])
        e_q, e_16 = eager_ms(lambda x=x: dg.dequant_gemm(x, packed)), eager_ms(lambda x=x: x @ w16.T)
        extra = {}
        if 1 < m <= 16:  # would the GEMV kernel (one row per program column) beat the tensor-core one?
            dg.gemv(x, packed)
            extra["us_gemv_kernel"] = graph_ms([lambda x=x, p=p: dg.gemv(x, p) for p in packs]) * 1e3
        moved = packed.nbytes + x.numel() * 2 + m * n * 2
        moved16 = w16.numel() * 2 + x.numel() * 2 + m * n * 2
        row = {"scheme": scheme, "K": k, "N": n, "M": m, "us_quant": t_q * 1e3, "us_fp16": t_16 * 1e3,
               "us_bf16": t_b16 * 1e3, "speedup_vs_fp16": t_16 / t_q, "speedup_vs_bf16": t_b16 / t_q,
               "eager_us_quant": e_q * 1e3, "eager_us_fp16": e_16 * 1e3,
               "packed_bytes": packed.nbytes, "bytes_per_weight": packed.nbytes / (n * k),
               "quant_GBps": moved / (t_q * 1e-3) / 1e9, "fp16_GBps": moved16 / (t_16 * 1e-3) / 1e9,
               "quant_bw_fraction": moved / (t_q * 1e-3) / copy_bw,
               "fp16_bw_fraction": moved16 / (t_16 * 1e-3) / copy_bw,
               "max_rel_diff_vs_fp16_matmul": rel, "tflops_quant": 2 * m * n * k / (t_q * 1e-3) / 1e12,
               "weight_copies_quant": r_q, "weight_copies_fp16": r_16, "config": cfg, **extra}
        rows.append(row)
        print(f"{scheme:>14} K={k:5d} N={n:5d} M={m:3d}  quant {t_q * 1e3:7.1f} us  fp16 {t_16 * 1e3:7.1f} us  "
              f"bf16 {t_b16 * 1e3:7.1f} us  x{t_16 / t_q:5.2f}  bw {row['quant_bw_fraction']:.2f} "
              f"(fp16 {row['fp16_bw_fraction']:.2f})  eager {e_q * 1e3:6.1f}/{e_16 * 1e3:6.1f} us  "
              f"rel {rel:.1e}  {extra}  {cfg}", flush=True)
    del packs, w16s, wb16s
    torch.cuda.empty_cache()
    print(f"  [{scheme} {k}x{n} done in {time.time() - t0:.0f} s]", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/gpu_dequant_gemm.json")
    ap.add_argument("--quick", action="store_true", help="one shape, int4 only (smoke run)")
    args = ap.parse_args()
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bw / 1e9:.0f} GB/s", flush=True)
    rows: list[dict] = []
    result = {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "copy_bandwidth_GBps": copy_bw / 1e9, "timing": "CUDA graph over rotating weight copies (cold L2), median of 30 replays per call",
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shapes = SHAPES[:1] if args.quick else SHAPES
    for i, (k, n) in enumerate(shapes):
        run_case("int4-g128-sym", int_weight(n, k, 4, 128, True, i), k, n, MS, copy_bw, rows)
        out.write_text(json.dumps(result, indent=1) + "\n")
    if not args.quick:
        for i, (k, n) in enumerate(shapes):
            for scheme, qt in (("int4-g128-asym", int_weight(n, k, 4, 128, False, 10 + i)),
                               ("int8-g128-sym", int_weight(n, k, 8, 128, True, 20 + i)),
                               ("fp8-channel", fp8_weight(n, k, 30 + i)), ("gguf-Q4_K", q4k_weight(n, k, 40 + i))):
                run_case(scheme, qt, k, n, (1,), copy_bw, rows)
                del qt
            out.write_text(json.dumps(result, indent=1) + "\n")
    result["summary"] = {f"{r['scheme']}_M{r['M']}_{r['K']}x{r['N']}_speedup_vs_fp16": round(r["speedup_vs_fp16"], 2)
                         for r in rows if r["M"] == 1 or r["scheme"] == "int4-g128-sym"}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"]), flush=True)


if __name__ == "__main__":
    main()
