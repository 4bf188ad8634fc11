"""AWQ's effect on each decoder block's output error, on the demo model.

Usage: python bench/awq_block_error.py [--bits 4] [--group-size 128] [--nsamples 128] [--seqlen 512]

For every block of the demo model, with the full-precision model's activations as inputs (as AWQ
itself sees them), the mean squared error of the block's output against full precision for:
plain min-max RTN (asymmetric, group-wise), AWQ's scales only (no clipping), and AWQ's scales and
clipping; plus what the scale search chose for each pair (alpha, grid family, the inspected
module's error before and after). Writes bench/results/awq_block_error.json.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from common import write

from infq.eval.datasets import calibration_windows
from infq.formats.hf import Checkpoint, demo_model_path, load_tokenizer, read_config
from infq.quantizers.awq import AwqBlock, awq_block, output_error
from infq.quantizers.calibrate import CalibrationContext, _run, embed_windows
from infq.quantizers.scheme import QuantConfig
from infq.runtime.arch import ModelConfig
from infq.runtime.loader import HFWeights
from infq.runtime.model import Rope, build_block


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    args = p.parse_args()
    src = demo_model_path()
    cfg = ModelConfig.from_hf(read_config(src))
    windows = calibration_windows(load_tokenizer(src), "demo", args.nsamples, args.seqlen, 0, None)
    config = QuantConfig(method="awq", bits=args.bits, group_size=args.group_size, sym=False)
    ctx = CalibrationContext(cfg, HFWeights(Checkpoint(src, mmap=False)), config, None)
    h = embed_windows(ctx, windows).float()  # (n, T, C)
    batch = max(1, 2048 // args.seqlen)
    rope = Rope(cfg)(torch.arange(args.seqlen).expand(batch, -1), torch.float32)
    rows = []
    for i in range(cfg.num_layers):
        block = build_block(cfg, ctx.source, i, torch.float32, torch.device("cpu"))
        new = awq_block(block, h, rope, batch, config, lambda r, i=i: cfg.arch.linear_name(i, r))
        orig = {r: m.weight.float() for r, m in block.linears.items()}
        plain = AwqBlock([], {}, orig, {r: None for r in orig},
                         {"input_norm": block.input_norm.data, "post_norm": block.post_norm.data}, {})
        scaled_only = dataclasses.replace(new, weights=_unclipped(block, new))
        row = {
            "block": i,
            "rtn_mse": output_error(block, plain, h, rope, batch, config),
            "awq_scales_mse": output_error(block, scaled_only, h, rope, batch, config),
            "awq_scales_clip_mse": output_error(block, new, h, rope, batch, config),
            "pairs": [{"prev": s.prev, "linears": list(s.linears), "alpha": s.alpha,
                       "family": "duo" if s.duo else "s_x^alpha", "inspected_mse_before": s.loss_before,
                       "inspected_mse_after": s.loss_after} for s in new.scales],
        }
        rows.append(row)
        print(f"block {i}: RTN {row['rtn_mse']:.5g}  AWQ scales {row['awq_scales_mse']:.5g}  "
              f"AWQ scales+clip {row['awq_scales_clip_mse']:.5g}", flush=True)
        _run(block, h, rope, batch, h)  # full-precision outputs feed the next block
    path = write("awq_block_error.json", {
        "model": "demo", "bits": args.bits, "group_size": args.group_size,
        "calibration": {"dataset": "demo", "nsamples": args.nsamples, "seqlen": args.seqlen},
        "metric": "mean squared error of the block output vs full precision, fake-quantized weights",
        "rows": rows,
    })
    print(f"wrote {path}")


def _unclipped(block, new: AwqBlock) -> dict[str, torch.Tensor]:
    """AWQ's scaled weights without the clipping: the original weights with the scales folded in."""
    from infq.quantizers.awq import apply_scales

    weights = {r: m.weight.float() for r, m in block.linears.items()}
    biases = {r: (None if m.bias is None else m.bias.float()) for r, m in block.linears.items()}
    norms = {"input_norm": block.input_norm.data.float(), "post_norm": block.post_norm.data.float()}
    return apply_scales(weights, biases, norms, new.scales)[0]


if __name__ == "__main__":
    main()
