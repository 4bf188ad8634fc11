"""PyTorch's packed int4 / int8 CPU kernels at a few rows: one call vs the runtime's row split.

Usage: python bench/int4_rows.py [--threads 2] [--reps 10] [--out int4_rows.json]

`aten._weight_int4pack_mm_for_cpu` works in blocks of 4 rows, and a last partial block costs a
whole one, while 1-3 rows alone take a cheaper path; `Int4PackKernel` therefore runs M = 4q + r
rows (r > 0, q > 0) as two calls. This times, for M = 1..17 rows of bfloat16 against twelve
distinct 11264 x 2048 int4 weights (TinyLlama-1.1B's fused gate/up, g128; 140 MB in all), the op
called once on all M rows and the kernel's split, and checks they agree bit for bit; and, for
reference, `aten._weight_int8pack_mm` called once (its steps are 8 rows wide, and splitting
them would gain 1.1x at most, so the runtime does not).
Writes bench/results/int4_rows.json (or `--out NAME`).
"""

from __future__ import annotations

import argparse

import torch
from common import best_of, write

from infq.kernels import dispatch
from infq.quantizers.scheme import QuantizedTensor, QuantScheme

N, K, G, COPIES = 11264, 2048, 128, 12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default="int4_rows.json", help="results file name under bench/results/")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    op4, op8 = torch.ops.aten._weight_int4pack_mm_for_cpu, torch.ops.aten._weight_int8pack_mm
    kernels = []  # the runtime's kernels (their _mm does the split), from random symmetric 4-bit g128 weights
    for _ in range(COPIES):
        codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
        scales = (torch.rand(N, K // G, generator=g) * 0.02 + 1e-3).half()
        zeros = torch.full((N, K // G), 8, dtype=torch.int32)
        g_idx = (torch.arange(K) // G).to(torch.int32)
        qt = QuantizedTensor(codes, scales, zeros, g_idx, QuantScheme(4, G, True), (N, K))
        kernels.append(dispatch.prepare(qt, "cpu", torch.bfloat16))
    assert all(k.name == "int4pack" and k._plain for k in kernels)
    packed, sz = [k.packed for k in kernels], [k.sz for k in kernels]
    int8 = [torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8) for _ in range(COPIES)]
    s8 = torch.rand(N, generator=g).to(torch.bfloat16)
    rows = []
    for m in range(1, 18):
        x = torch.randn(m, K, generator=g).to(torch.bfloat16)
        whole = best_of(lambda x=x: [op4(x, w, G, z) for w, z in zip(packed, sz, strict=True)], args.reps)
        split = best_of(lambda x=x: [k._mm(x) for k in kernels], args.reps)
        same = all(torch.equal(op4(x, k.packed, G, k.sz), k._mm(x)) for k in kernels)
        i8 = best_of(lambda x=x: [op8(x, w, s8) for w in int8], args.reps)
        rows.append({"m": m, "int4_one_call_ms": round(whole / COPIES * 1e3, 3),
                     "int4_split_ms": round(split / COPIES * 1e3, 3), "bit_identical": same,
                     "int8_ms": round(i8 / COPIES * 1e3, 3)})
        r = rows[-1]
        print(f"M={m:<3} int4 one call {r['int4_one_call_ms']:.2f} ms, split {r['int4_split_ms']:.2f} ms "
              f"({whole / split:.2f}x, identical {same}); int8 {r['int8_ms']:.2f} ms", flush=True)
    print(write(args.out, {"threads": args.threads, "n": N, "k": K, "group": G, "copies": COPIES, "rows": rows}))


if __name__ == "__main__":
    main()
