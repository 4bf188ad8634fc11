"""End-to-end decode at batch 1 against the memory-bandwidth roofline, eager vs CUDA graphs.

Usage: python bench/gpu_decode.py [--shape tinyllama|llama7b] [--layers N] [--variants bf16,int4-g128]
                                  [--tokens 128] [--device cuda] [--out gpu_decode.json]

A random-weight Llama of the given shape (TinyLlama-1.1B: 22 layers, 2048 hidden, 5632 ffn, 32/4
heads; llama7b: Llama-2-7B's 32 layers, 4096, 11008, 32/32 heads; vocab 32000) is written as fp16
safetensors (bench/quantize_memory.py's builder); int4 variants are written by `infq quantize
--method rtn` (GPTQ layout, groups of 128), which the runtime serves through the Triton
dequant-GEMM on CUDA. Each (variant, graphs) row runs in its own process: the model loaded as
`infq run` loads it; its weight bytes read per token = the device memory the loaded model holds
minus the embedding table (one row of it is read per token); the engine (one request, paged KV)
warms up, then decodes `--tokens` tokens after an 8-token prompt, three times, fastest kept
(tokens/s = (n - 1) / (last token - first token), as `infq run` reports it). The roofline is the
measured device-to-device copy bandwidth divided by those bytes: what decoding would reach if every
step only streamed the weights once at copy speed. Writes bench/results/<out> with the machine.

`--device cpu --layers 2` runs the same steps on a CPU (no graphs, no roofline): a check that the
script works, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import infq, write
from quantize_memory import build

SHAPES = {  # layers, hidden, ffn, heads, kv heads, vocab
    "tinyllama": (22, 2048, 5632, 32, 4, 32000),
    "llama7b": (32, 4096, 11008, 32, 32, 32000),
}
VARIANTS = {  # name -> infq quantize arguments (None: the fp16 checkpoint served in bf16)
    "bf16": None,
    "int4-g128": ["--bits", "4", "--group-size", "128"],
    "int8": ["--bits", "8", "--group-size", "-1"],
}
PROMPT = [1, 415, 2936, 3060, 285, 1142, 3305, 754]


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy of 1 GiB: (read + write bytes) / time, bytes/s (median of 20)."""
    import torch

    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(23):
        torch.cuda.synchronize()
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times = sorted(times[3:])
    return 2 * a.numel() / times[len(times) // 2]


def measure(spec: dict) -> dict:
    """One row, in this process."""
    import torch

    from infq.runtime.engine import Engine, EngineConfig
    from infq.runtime.loader import load_model
    from infq.runtime.sampling import SamplingParams

    cuda = spec["device"] == "cuda"
    before = torch.cuda.memory_allocated() if cuda else 0
    model = load_model(spec["path"], dtype="bfloat16", device=spec["device"], tokenizer=False, serving=True).model
    weights = (torch.cuda.memory_allocated() - before) if cuda else None
    embed = model.embed_weight.numel() * model.embed_weight.element_size()
    kernels = sorted({getattr(lin, "impl", type(lin).__name__) for b in model.blocks
                      for lin in [*b.linears.values(), *b.fused.values()]})
    engine = Engine(model, EngineConfig(max_num_seqs=1, kv_memory=256 << 20, cuda_graphs=spec["graphs"]))
    greedy = SamplingParams(temperature=0.0)

    def rate(n: int) -> float:
        return engine.generate([PROMPT], greedy, max_tokens=n + 1, ignore_eos=True)[0].tokens_per_s

    rate(8)  # autotuning, graph capture
    best = max(rate(spec["tokens"]) for _ in range(3))
    row = {"kernels": kernels, "tokens_per_s": round(best, 2)}
    if weights is not None:
        row["weight_bytes_per_token"] = weights - embed
        row["graph_replays"] = engine.graphs.calls if engine.graphs is not None else 0
    return row


def run_one(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                         timeout=3600)
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-1500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tinyllama", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, help="override the shape's layer count (a quick check)")
    ap.add_argument("--variants", default="bf16,int4-g128")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="gpu_decode.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    layers, hidden, ffn, heads, kv, vocab = SHAPES[args.shape]
    layers = args.layers or layers
    cuda = args.device == "cuda"
    bw = None
    if cuda:
        import torch

        bw = copy_bandwidth("cuda")
        print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / args.shape
        params = build(base, layers, hidden, ffn, heads, kv, vocab)
        print(f"built {args.shape} ({layers} layers, {params / 1e9:.2f} B parameters)", flush=True)
        for variant in args.variants.split(","):
            path = base
            if VARIANTS[variant] is not None:
                path = Path(tmp) / variant
                infq("quantize", "--model", base, "--method", "rtn", *VARIANTS[variant], "--out", path,
                     "--device", args.device, timeout=3600)
            for graphs in ([False, True] if cuda else [False]):
                res = run_one({"path": str(path), "device": args.device, "graphs": graphs, "tokens": args.tokens})
                row = {"variant": variant, "cuda_graphs": graphs, **res}
                if bw and "weight_bytes_per_token" in res:
                    roof = bw / res["weight_bytes_per_token"]
                    row["roofline_tokens_per_s"] = round(roof, 1)
                    row["fraction_of_roofline"] = round(res["tokens_per_s"] / roof, 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    payload = {"shape": args.shape, "layers": layers, "params": params, "tokens": args.tokens,
               "copy_bandwidth_GBps": round(bw / 1e9, 1) if bw else None, "rows": rows}
    if cuda:
        print("wrote", write(args.out, payload))
    else:
        print(json.dumps(payload))


if __name__ == "__main__":
    main()
