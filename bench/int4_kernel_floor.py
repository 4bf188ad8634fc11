"""The CPU int4 decode floor: PyTorch's int4 kernel alone on the 1.1B shape's linears, at M = 1.

Usage: python bench/int4_kernel_floor.py [--threads 2] [--reps 200]

Times `aten._weight_int4pack_mm_for_cpu` (bfloat16, group 128, the kernel infq's CPU int4 path
runs) on every linear of TinyLlama-1.1B's shape, q/k/v and gate/up fused as `infq run` loads them,
plus the 32000-row lm_head; the sum over 22 layers is the time per token with no other work (no
attention, norms or Python), so its inverse bounds the tokens/s any engine on this kernel can
reach. Also the achieved weight bandwidth (code bytes / time). Writes
bench/results/int4_kernel_floor.json.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import write

LINEARS = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632)}
LAYERS, HEAD = 22, (32000, 2048)


def time_linear(n: int, k: int, reps: int, group: int = 128) -> float:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    sz = torch.randn(k // group, n, 2, generator=g).to(torch.bfloat16)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    op = torch.ops.aten._weight_int4pack_mm_for_cpu.default
    for _ in range(10):
        op(x, packed, group, sz)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            op(x, packed, group, sz)
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows, layer_s = [], 0.0
    for name, (n, k) in {**LINEARS, "lm_head": HEAD}.items():
        s = time_linear(n, k, args.reps)
        rows.append({"linear": name, "n": n, "k": k, "us": round(s * 1e6, 1), "gb_per_s": round(n * k / 2 / s / 1e9, 1)})
        print(f"{name:>8} {n:>6} x {k:<5} {s * 1e6:8.1f} us  {n * k / 2 / s / 1e9:5.1f} GB/s (codes)", flush=True)
        if name != "lm_head":
            layer_s += s
    head_s = rows[-1]["us"] / 1e6
    token_s = LAYERS * layer_s + head_s
    out = {"threads": args.threads, "layers": LAYERS, "rows": rows, "layer_ms": round(layer_s * 1e3, 3),
           "token_ms_int4_head": round(token_s * 1e3, 2), "tokens_per_s_bound_int4_head": round(1 / token_s, 1)}
    print(f"per layer {layer_s * 1e3:.3f} ms; per token (int4 lm_head) {token_s * 1e3:.2f} ms -> at most "
          f"{1 / token_s:.1f} tokens/s")
    print(write("int4_kernel_floor.json", out))


if __name__ == "__main__":
    main()
