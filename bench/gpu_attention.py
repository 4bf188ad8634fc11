"""GPU attention kernels against PyTorch: FlashAttention prefill vs SDPA, paged decode vs gather + SDPA.

Usage: python bench/gpu_attention.py [--out bench/results/gpu_attention.json] [--quick]

1. Prefill: `flash_attention_varlen` (causal, hd 128, 32 query / 8 kv heads, ~16k tokens per call:
   batch 16384 // seq) vs `torch.nn.functional.scaled_dot_product_attention` on the same tensors,
   is_causal, with the kv heads expanded beforehand (SDPA's flash backend; expansion not timed) and
   with `enable_gqa=True`. TFLOP/s count causal attention as half of 4 * B * S^2 * H * D.
2. Decode: `paged_attention` (one token per sequence, block size 16, shuffled blocks) vs gathering
   each sequence's blocks into a contiguous tensor and calling SDPA with a length mask (what a
   runtime without a paged kernel does; the gather is timed). GB/s = K/V (+ scale) bytes of the
   live tokens / GPU time, next to a measured device-to-device copy bandwidth.
3. Fused ops: RMSNorm + residual add and SiLU-gate multiply vs the PyTorch expressions.
Prefill times are `triton.testing.do_bench` medians (L2 flushed between runs). Decode and fused-op
times are GPU times from CUDA-graph replays with the L2 flushed before each call (`_graph_us`), as
an engine replaying captured decode steps sees them; decode's eager times (Python launch included)
are recorded beside them. Results are written after each section, so a cut-short run keeps them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine  # noqa: E402

from infq.kernels.flash_attention import _tuned as _fa_tuned  # noqa: E402
from infq.kernels.flash_attention import flash_attention_varlen  # noqa: E402
from infq.kernels.fused import rms_norm, silu_mul  # noqa: E402
from infq.kernels.paged_attention import _tuned as _pa_tuned  # noqa: E402
from infq.kernels.paged_attention import paged_attention, write_kv  # noqa: E402
from infq.kernels.ref import rms_norm_ref  # noqa: E402

H, HKV, D, BS = 32, 8, 128, 16


def _ms(fn) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


_FLUSH = None  # a 256 MiB buffer whose zeroing evicts the 60 MB L2


def _graph_us(fn, reps: int = 20) -> float:
    try:
        return _graph_us_raw(fn, reps)
    except Exception as e:  # keep the section's other numbers if capture fails
        print(f"graph timing failed: {e!r}", flush=True)
        return float("nan")


def _graph_us_raw(fn, reps: int) -> float:
    """GPU time of fn without Python launch overhead and with a cold L2: CUDA graphs of reps x
    (flush, fn) and of reps x flush, replayed 5 times each; the median difference per rep, in us."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    times = {}
    for with_fn in (True, False):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm (allocator, autotuner) outside the capture
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=stream):
                for _ in range(reps):
                    _FLUSH.zero_()
                    if with_fn:
                        fn()
        torch.cuda.current_stream().wait_stream(stream)
        g.replay()
        torch.cuda.synchronize()
        ts = []
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        times[with_fn] = sorted(ts)[2]
    return max(times[True] - times[False], 1e-3) * 1e3 / reps


def bench_flash(seqs: list[int], dtypes: list[torch.dtype]) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for s in seqs:
            rows.append(_flash_case(dtype, s))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _flash_case(dtype: torch.dtype, s: int) -> dict:
    b = max(1, 16384 // s)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b * s, H, D, device="cuda", dtype=dtype, generator=g)  # (T, H, D)
    k = torch.randn(b * s, HKV, D, device="cuda", dtype=dtype, generator=g)  # (T, Hkv, D)
    v = torch.randn(b * s, HKV, D, device="cuda", dtype=dtype, generator=g)
    cu = torch.arange(0, b + 1, device="cuda", dtype=torch.int32) * s
    t0 = time.perf_counter()
    ours = flash_attention_varlen(q, k, v, cu, cu, s, s)  # autotunes on first use
    torch.cuda.synchronize()
    tune_s = time.perf_counter() - t0
    qs = q.view(b, s, H, D).transpose(1, 2)  # (B, H, S, D) views of the same memory
    ks = k.view(b, s, HKV, D).repeat_interleave(H // HKV, dim=2).transpose(1, 2)
    vs = v.view(b, s, HKV, D).repeat_interleave(H // HKV, dim=2).transpose(1, 2)
    ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)  # (B, H, S, D)
    diff = (ours.view(b, s, H, D).transpose(1, 2).float() - ref.float()).abs().max().item()
    t_ours = _ms(lambda: flash_attention_varlen(q, k, v, cu, cu, s, s))
    t_sdpa = _ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
    kg, vg = k.view(b, s, HKV, D).transpose(1, 2), v.view(b, s, HKV, D).transpose(1, 2)
    try:
        t_gqa = _ms(lambda: F.scaled_dot_product_attention(qs, kg, vg, is_causal=True, enable_gqa=True))
    except (RuntimeError, TypeError):
        t_gqa = None
    flops = 4 * b * s * s * H * D / 2
    row = {"dtype": str(dtype).removeprefix("torch."), "seq": s, "batch": b, "heads": H, "kv_heads": HKV,
           "head_dim": D, "infq_ms": round(t_ours, 4), "sdpa_ms": round(t_sdpa, 4),
           "sdpa_gqa_ms": None if t_gqa is None else round(t_gqa, 4),
           "infq_tflops": round(flops / t_ours / 1e9, 1), "sdpa_tflops": round(flops / t_sdpa / 1e9, 1),
           "speedup_vs_sdpa": round(t_sdpa / t_ours, 3), "max_abs_diff_vs_sdpa": diff,
           "first_call_s_incl_autotune": round(tune_s, 2), "config": str(_fa_tuned.best_config)}
    return row


def _cache(batch: int, ctx: int, cache_dtype: torch.dtype, dtype: torch.dtype):
    """A shuffled paged cache holding `ctx` tokens for each of `batch` sequences."""
    nblk = -(-ctx // BS)
    nb = batch * nblk
    g = torch.Generator(device="cuda").manual_seed(1)
    tables = torch.randperm(nb, device="cuda", generator=g).view(batch, nblk).to(torch.int32)
    kc = torch.empty(nb, BS, HKV, D, device="cuda", dtype=cache_dtype)
    vc = torch.empty_like(kc)
    quant = cache_dtype in (torch.int8, torch.float8_e4m3fn)
    ks = torch.empty(nb, BS, HKV, device="cuda") if quant else None
    vs = torch.empty_like(ks) if quant else None
    pos = torch.arange(ctx, device="cuda")
    for b in range(batch):  # fill through the write kernel
        slots = tables[b, pos // BS].long() * BS + pos % BS
        kv = torch.randn(2, ctx, HKV, D, device="cuda", generator=g).to(dtype)
        write_kv(kv[0], kv[1], kc, vc, slots, ks, vs)
    return kc, vc, ks, vs, tables


def bench_paged(cases: list[tuple[int, int, str]], dtype: torch.dtype) -> list[dict]:
    rows = []
    for batch, ctx, kv in cases:
        rows.append(_paged_case(batch, ctx, kv, dtype))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _paged_case(batch: int, ctx: int, kv: str, dtype: torch.dtype) -> dict:
    cache_dtype = {"bf16": dtype, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[kv]
    kc, vc, ks, vs, tables = _cache(batch, ctx, cache_dtype, dtype)
    q = torch.randn(batch, H, D, device="cuda", dtype=dtype)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    ours = paged_attention(q, kc, vc, tables, lens, k_scale=ks, v_scale=vs)
    t_ours = _ms(lambda: paged_attention(q, kc, vc, tables, lens, k_scale=ks, v_scale=vs))
    mask = (torch.arange(tables.shape[1] * BS, device="cuda")[None, :] < lens[:, None])[:, None, None, :]

    def baseline(q=q, kc=kc, vc=vc, ks=ks, vs=vs, tables=tables, mask=mask):
        idx = tables.long()
        k = kc[idx].flatten(1, 2)  # (B, L, Hkv, D) gathered
        v = vc[idx].flatten(1, 2)
        if ks is not None:
            k = (k.to(dtype) * ks[idx].flatten(1, 2)[..., None].to(dtype))
            v = (v.to(dtype) * vs[idx].flatten(1, 2)[..., None].to(dtype))
        return F.scaled_dot_product_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask, enable_gqa=True)[:, :, 0]

    ref = baseline()
    t_base = _ms(baseline)
    best = str(_pa_tuned.best_config)
    g_ours = _graph_us(lambda: paged_attention(q, kc, vc, tables, lens, k_scale=ks, v_scale=vs))
    g_base = _graph_us(baseline)
    elem = kc.element_size()
    nbytes = 2 * batch * ctx * HKV * (D * elem + (4 if ks is not None else 0))
    row = {"kv": kv, "batch": batch, "context": ctx, "heads": H, "kv_heads": HKV, "head_dim": D,
           "infq_gpu_us": round(g_ours, 2), "gather_sdpa_gpu_us": round(g_base, 2),
           "infq_gbs": round(nbytes / g_ours / 1e3, 1), "gather_sdpa_gbs": round(nbytes / g_base / 1e3, 1),
           "speedup": round(g_base / g_ours, 2),
           "infq_eager_us": round(t_ours * 1e3, 2), "gather_sdpa_eager_us": round(t_base * 1e3, 2),
           "max_abs_diff": (ours.float() - ref.float()).abs().max().item(), "config": best}
    return row


def copy_bandwidth() -> float:
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return round(2 * x.numel() / _ms(lambda: y.copy_(x)) / 1e6, 1)  # GB/s, read + write


def bench_fused(dtype: torch.dtype) -> list[dict]:
    rows = []
    for t, c in [(1, 4096), (64, 4096), (4096, 4096), (4096, 8192)]:
        x = torch.randn(t, c, device="cuda", dtype=dtype)
        r, w = torch.randn_like(x), torch.randn(c, device="cuda", dtype=dtype)
        a = _graph_us(lambda: rms_norm(x, w, 1e-5, residual=r)) / 1e3  # noqa: B023
        b = _graph_us(lambda: rms_norm_ref(x, w, 1e-5, residual=r)) / 1e3  # noqa: B023
        rows.append({"op": "rms_norm+residual", "tokens": t, "cols": c, "infq_us": round(a * 1e3, 2),
                     "torch_us": round(b * 1e3, 2), "speedup": round(b / a, 2)})
        print(json.dumps(rows[-1]), flush=True)
    for t, f in [(1, 14336), (64, 14336), (4096, 14336)]:
        gu = torch.randn(t, 2 * f, device="cuda", dtype=dtype)
        g, u = gu[:, :f], gu[:, f:]
        a = _graph_us(lambda: silu_mul(g, u)) / 1e3  # noqa: B023
        b = _graph_us(lambda: F.silu(g) * u) / 1e3  # noqa: B023
        rows.append({"op": "silu_mul", "tokens": t, "cols": f, "infq_us": round(a * 1e3, 2),
                     "torch_us": round(b * 1e3, 2), "speedup": round(b / a, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu_attention.json"))
    p.add_argument("--quick", action="store_true", help="fewer sizes (a smoke run)")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": machine(), "device": torch.cuda.get_device_name(0), "triton": triton.__version__,
                 "timing": "triton.testing.do_bench median, warmup 25 ms, rep 100 ms"}

    def save() -> None:
        out.write_text(json.dumps(res, indent=2) + "\n")

    res["copy_bandwidth_gbs"] = copy_bandwidth()
    save()
    seqs = [1024, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
    res["flash_prefill"] = bench_flash(seqs, [torch.bfloat16, torch.float16])
    save()
    cases = [(1, 4096, "bf16"), (1, 32768, "bf16"), (8, 8192, "bf16"), (32, 2048, "bf16"), (64, 4096, "bf16"),
             (256, 1024, "bf16"), (8, 8192, "int8"), (8, 8192, "fp8"), (1, 32768, "int8"), (64, 4096, "fp8")]
    res["paged_decode"] = bench_paged(cases[:3] if args.quick else cases, torch.bfloat16)
    save()
    res["fused"] = bench_fused(torch.bfloat16)
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = True
    with torch.inference_mode():
        main()
