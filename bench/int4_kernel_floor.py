"""The CPU int4 decode floor: PyTorch's int4 kernel alone on the 1.1B shape's linears, at M = 1.

Usage: python bench/int4_kernel_floor.py [--threads 2] [--reps 20]

Builds 22 layers of distinct packed weights in TinyLlama-1.1B's shape (q/k/v and gate/up fused as
`infq run` loads them, groups of 128, bfloat16 scales) plus a 32000-row int4 lm_head, and times
`aten._weight_int4pack_mm_for_cpu` (the kernel infq's CPU int4 path runs) over all of them in a
token's order: every weight comes from DRAM once per token, as in decoding. That time is the
per-token floor with no other work (no attention, norms or Python), so its inverse bounds the
tokens/s any engine on this kernel can reach. Also:
  * "hot": each linear timed on its own, the same weights again and again (they then sit partly in
    the 32 MB L3 cache; an earlier version of this script reported only this, and over-estimated
    the bound by 20 %);
  * the machine's streaming read bandwidth (a float32 sum over 600 MB), the roofline of any
    decoder on this machine: bytes of weights per token / bandwidth.
Writes bench/results/int4_kernel_floor.json.
"""

from __future__ import annotations

import argparse

import torch
from common import best_of, write

LINEARS = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632)}
LAYERS, HEAD, GROUP = 22, (32000, 2048), 128
OP = torch.ops.aten._weight_int4pack_mm_for_cpu.default


def packed_linear(n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)  # (n, k / 2) uint8
    sz = torch.randn(k // GROUP, n, 2, generator=g).to(torch.bfloat16)  # scales and offsets
    return packed, sz


def nbytes(w: tuple[torch.Tensor, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in w)


def stream_bandwidth(size: int = 600 << 20) -> float:
    x = torch.ones(size // 4, dtype=torch.float32)
    return size / best_of(lambda: x.sum(), 5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    layers = [{name: packed_linear(n, k, g) for name, (n, k) in LINEARS.items()} for _ in range(LAYERS)]
    head = packed_linear(*HEAD, g)
    xs = {k: torch.randn(1, k, generator=g).to(torch.bfloat16) for k in {k for _, k in [*LINEARS.values(), HEAD]}}
    shapes = {**LINEARS, "lm_head": HEAD}

    rows = []
    for name, (n, k) in shapes.items():
        w = head if name == "lm_head" else layers[0][name]
        hot = best_of(lambda x=xs[k], w=w: OP(x, w[0], GROUP, w[1]), 200)
        rows.append({"linear": name, "n": n, "k": k, "hot_us": round(hot * 1e6, 1),
                     "hot_gb_per_s": round(nbytes(w) / hot / 1e9, 1)})

    def token() -> None:
        for layer in layers:
            for name, (_n, k) in LINEARS.items():
                OP(xs[k], layer[name][0], GROUP, layer[name][1])
        OP(xs[HEAD[1]], head[0], GROUP, head[1])

    token_s = best_of(token, args.reps)
    weight_bytes = sum(nbytes(w) for layer in layers for w in layer.values()) + nbytes(head)
    bw = stream_bandwidth()
    out = {"threads": args.threads, "layers": LAYERS, "group": GROUP, "hot_rows": rows,
           "weight_bytes_per_token": weight_bytes, "token_ms": round(token_s * 1e3, 2),
           "tokens_per_s_bound": round(1 / token_s, 1), "kernel_gb_per_s": round(weight_bytes / token_s / 1e9, 1),
           "stream_read_gb_per_s": round(bw / 1e9, 1), "roofline_tokens_per_s": round(bw / weight_bytes, 1)}
    for r in rows:
        print(f"{r['linear']:>8} {r['n']:>6} x {r['k']:<5} hot {r['hot_us']:8.1f} us  {r['hot_gb_per_s']:5.1f} GB/s")
    print(f"a token's linears from DRAM: {token_s * 1e3:.2f} ms, {weight_bytes / token_s / 1e9:.1f} GB/s -> at most "
          f"{1 / token_s:.1f} tokens/s; stream read {bw / 1e9:.1f} GB/s -> roofline {bw / weight_bytes:.1f} tokens/s")
    print(write("int4_kernel_floor.json", out))


if __name__ == "__main__":
    main()
