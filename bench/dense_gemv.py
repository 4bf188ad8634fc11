"""Dense CPU matmul at decode shapes: oneDNN vs ATen's own GEMV, bytes of weight streamed per second.

Usage: python bench/dense_gemv.py [--threads 2] [--reps 10] [--out dense_gemv.json]

For M = 1, 2, 4, 5, 8, 16 rows and bfloat16 / float16 / float32, times `F.linear` against twelve
distinct 11264 x 2048 weights (TinyLlama-1.1B's fused gate/up; 550 MB in bf16, more than twice
the largest L3 of these machines, so the weights come from DRAM) four ways: oneDNN enabled
(PyTorch's default: oneDNN reorders the plain weight into its blocked layout at every call),
oneDNN disabled (ATen's vectorized fp32-accumulating GEMV/GEMM, MKL for float32), oneDNN on a
weight reordered once beforehand (`mkldnn._reorder_linear_weight` + `mkldnn._linear_pointwise`,
what inductor's weight freezing does), and `infq.kernels.dispatch.linear`, the runtime's choice
for a plain weight. Reports GB/s of weight read (weight bytes / time). Writes
bench/results/dense_gemv.json (or `--out NAME`).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import best_of, write

from infq.kernels import dispatch

N, K, COPIES = 11264, 2048, 12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default="dense_gemv.json", help="results file name under bench/results/")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ws = [torch.randn(N, K, dtype=torch.float32).to(dtype) for _ in range(COPIES)]
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in ws]

        def onednn_packed(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        for m in (1, 2, 4, 5, 8, 16):
            x = torch.randn(m, K).to(dtype)
            res = {}
            for name, fn, mkldnn, weights in (("onednn", F.linear, True, ws), ("aten", F.linear, False, ws),
                                              ("onednn_packed", onednn_packed, True, packed),
                                              ("infq", dispatch.linear, True, ws)):
                torch._C._set_mkldnn_enabled(mkldnn)
                try:
                    res[name] = round(nbytes / best_of(lambda fn=fn, x=x, ws=weights: [fn(x, w) for w in ws],
                                                       args.reps) / 1e9, 1)
                finally:
                    torch._C._set_mkldnn_enabled(True)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "m": m, "gb_per_s": res})
            print(f"{rows[-1]['dtype']:>8} M={m:<3} " + "  ".join(f"{k} {v:5.1f}" for k, v in res.items()) + " GB/s",
                  flush=True)
        del ws, packed
    print(write(args.out, {"threads": args.threads, "n": N, "k": K, "copies": COPIES, "rows": rows}))


if __name__ == "__main__":
    main()
