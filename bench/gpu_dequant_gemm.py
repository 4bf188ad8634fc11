"""GPU benchmark of the Triton dequant-GEMM against PyTorch's fp16/bf16 matmul (cuBLAS).

Writes bench/results/gpu_dequant_gemm.json (device, versions, measured copy bandwidth, one row per
case). Shapes are (K -> N) = (in -> out): 4096 -> 4096, 4096 -> 14336 and 14336 -> 4096 (a Llama-3-8B
attention projection, the MLP up and down projections). For int4 g128 (GPTQ symmetric) every M in
1, 4, 16, 64, 256 is timed against `x @ W.T` in fp16 and in bf16; at M = 1 also int4 g128
asymmetric, int8 g128, FP8 e4m3 per-channel and GGUF Q4_K. Times come from
`triton.testing.do_bench` (CUDA events, L2 flushed before every call, so weights come from HBM;
the median is reported). Bandwidth at M = 1 is (packed weight + x + y bytes) / time, as a fraction
of a device-to-device copy measured in the same run (bytes read + written / time). Every timed
output is also checked against the fp16 matmul of the dequantized weight (max |diff| / max |y|).

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


def bench_ms(fn) -> float:
    fn()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def best_config(m: int) -> str:
    tuner = dg._gemv_tuned if m <= dg.GEMV_MAX_M else dg._gemm_tuned
    return str(getattr(tuner, "best_config", ""))


def run_case(scheme: str, qt: QuantizedTensor, k: int, n: int, ms: tuple[int, ...], copy_bw: float,
             rows: list[dict]) -> None:
    t0 = time.time()
    packed = dg.pack(qt)
    w16 = qt.dequantize(torch.float16) if not qt.scheme.kind.startswith("gguf") else \
        qt.dequantize(torch.float32).half()  # (N, K)
    wb16 = w16.bfloat16()
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        xb = x.bfloat16()
        t_q = bench_ms(lambda x=x: dg.dequant_gemm(x, packed))
        cfg = best_config(m)
        y = dg.dequant_gemm(x, packed).float()
        y_ref = (x @ w16.T).float()
        rel = ((y - y_ref).abs().max() / y_ref.abs().max().clamp_min(1e-30)).item()
        t_16 = bench_ms(lambda x=x: x @ w16.T)
        t_b16 = bench_ms(lambda xb=xb: xb @ wb16.T)
        moved = packed.nbytes + x.numel() * 2 + m * n * 2
        moved16 = w16.numel() * 2 + x.numel() * 2 + m * n * 2
        row = {"scheme": scheme, "K": k, "N": n, "M": m, "ms_quant": t_q, "ms_fp16": t_16, "ms_bf16": t_b16,
               "speedup_vs_fp16": t_16 / t_q, "speedup_vs_bf16": t_b16 / t_q,
               "packed_bytes": packed.nbytes, "bytes_per_weight": packed.nbytes / (n * k),
               "quant_GBps": moved / (t_q * 1e-3) / 1e9, "fp16_GBps": moved16 / (t_16 * 1e-3) / 1e9,
               "quant_bw_fraction": moved / (t_q * 1e-3) / copy_bw,
               "fp16_bw_fraction": moved16 / (t_16 * 1e-3) / copy_bw,
               "max_rel_diff_vs_fp16_matmul": rel, "tflops_quant": 2 * m * n * k / (t_q * 1e-3) / 1e12,
               "config": cfg}
        rows.append(row)
        print(f"{scheme:>14} K={k:5d} N={n:5d} M={m:3d}  quant {t_q * 1e3:8.1f} us  fp16 {t_16 * 1e3:8.1f} us  "
              f"bf16 {t_b16 * 1e3:8.1f} us  x{t_16 / t_q:5.2f}  bw {row['quant_bw_fraction']:.2f} "
              f"(fp16 {row['fp16_bw_fraction']:.2f})  rel {rel:.1e}  {cfg}", flush=True)
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
              "copy_bandwidth_GBps": copy_bw / 1e9, "timing": "triton.testing.do_bench median, L2 flushed",
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
    m1 = [r for r in rows if r["scheme"] == "int4-g128-sym" and r["M"] == 1]
    result["summary"] = {f"int4_M1_speedup_vs_fp16_{r['K']}x{r['N']}": round(r["speedup_vs_fp16"], 2) for r in m1}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"]), flush=True)


if __name__ == "__main__":
    main()
