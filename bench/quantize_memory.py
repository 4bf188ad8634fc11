"""Quantization time and peak RSS on a random-weight model of >= 1B parameters.

Usage: python bench/quantize_memory.py [--layers 22] [--methods rtn,gptq] [--nsamples 16] [--seqlen 512]

Builds a Llama in TinyLlama-1.1B's shape (hidden 2048, FFN 5632, 22 layers, 32 heads / 4 KV heads,
vocab 32000) with random float16 weights, written tensor by tensor (the builder never holds the
model), with the demo model's tokenizer. Then quantizes it with each method in its own
`infq quantize --json` process and reports wall time and that process's peak RSS next to the
model's fp16 size: the calibration driver keeps one block resident, so peak RSS should track one
block plus the calibration activations, not the model. Writes bench/results/quantize_memory.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from common import infq, write

from infq.formats.hf import demo_model_path
from infq.formats.safetensors_io import SafetensorsWriter


def build(path: Path, layers: int, hidden: int, ffn: int, heads: int, kv: int, vocab: int) -> int:
    path.mkdir(parents=True)
    d = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * d, hidden), p + "self_attn.k_proj.weight": (kv * d, hidden),
            p + "self_attn.v_proj.weight": (kv * d, hidden), p + "self_attn.o_proj.weight": (hidden, heads * d),
            p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    gen = torch.Generator().manual_seed(0)
    writer = SafetensorsWriter(path / "model.safetensors", {"format": "pt"})
    params = 0
    for name, shape in shapes.items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.float16)
        else:
            t = (torch.randn(shape, generator=gen) * shape[1] ** -0.5).half()
        writer.add(name, t)
        params += t.numel()
    writer.close()
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16", "hidden_act": "silu",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for f in demo_model_path().iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, path / f.name)
    return params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--methods", default="rtn,gptq")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="infq-mem-"))
    try:
        model = work / "random-1b"
        params = build(model, args.layers, 2048, 5632, 32, 4, 32000)
        fp16_bytes = (model / "model.safetensors").stat().st_size
        print(f"built {params / 1e9:.3f} B parameters, {fp16_bytes / 2**30:.2f} GiB fp16", flush=True)
        rows = []
        for method in args.methods.split(","):
            q = infq("quantize", "--model", model, "--method", method, "--bits", args.bits,
                     "--group-size", args.group_size, "--dataset", "demo", "--nsamples", args.nsamples,
                     "--seqlen", args.seqlen, "--out", work / method, timeout=7200)
            row = {"method": method, "seconds": q["seconds"], "peak_rss_bytes": q["peak_rss_bytes"],
                   "peak_rss_over_fp16": q["peak_rss_bytes"] / fp16_bytes, "bytes_after": q["bytes_after"],
                   "bits_per_weight": q["bits_per_weight"]}
            rows.append(row)
            print(f"{method}: {q['seconds']:.1f} s, peak RSS {q['peak_rss_bytes'] / 2**20:.0f} MiB "
                  f"= {row['peak_rss_over_fp16']:.3f} x fp16 size", flush=True)
            shutil.rmtree(work / method)
        path = write("quantize_memory.json", {
            "model": {"shape": "TinyLlama-1.1B", "layers": args.layers, "parameters": params, "fp16_bytes": fp16_bytes},
            "calibration": {"dataset": "demo", "nsamples": args.nsamples, "seqlen": args.seqlen},
            "bits": args.bits, "group_size": args.group_size, "rows": rows,
        })
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
