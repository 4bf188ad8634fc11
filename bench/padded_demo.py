"""The demo model embedded in TinyLlama-1.1B's shape: the demo's predictions at a 1.1B model's cost.

Usage: python bench/padded_demo.py OUT [--layers 22]

No larger real model reaches these machines, and a random-weight model predicts noise (a quantized
copy of it agrees with it on almost no token), so speculative decoding cannot be measured on one.
This writes a Llama with hidden 2048, FFN 5632, 32 heads / 4 KV heads of 64 and `--layers` layers
whose function is exactly the demo's: the demo's weights fill the top-left corner of every matrix
(its 4 heads placed where the 8:1 grouping maps them onto its 2 KV heads), every other entry is
zero; the RMSNorm weights are divided by sqrt(2048 / 256) and eps by 8, so the wider norm gives the
same values; layers past the demo's 4 carry random q/k/v/gate/up weights and zero o/down
projections, so they add nothing to the residual stream but cost what a real layer costs. Vocabulary
and tokenizer are the demo's. `check(path)` compares its logits with the demo's.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

HIDDEN, FFN, HEADS, KV, D = 2048, 5632, 32, 4, 64


def build(path: Path, layers: int = 22) -> int:
    from infq.formats.hf import Checkpoint, demo_model_path, read_config
    from infq.formats.safetensors_io import SafetensorsWriter

    demo = demo_model_path()
    cfg = read_config(demo)
    ck = Checkpoint(demo)
    c, h, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    assert cfg["head_dim"] == D and layers >= cfg["num_hidden_layers"]
    rep, rep2 = h // kv, HEADS // KV
    pos = [(i // rep) * rep2 + i % rep for i in range(h)]  # padded q head of demo head i (same KV head)
    norm = math.sqrt(c / HIDDEN)
    gen = torch.Generator().manual_seed(0)

    def get(name: str) -> torch.Tensor:
        return ck.get(name).to(torch.float32)

    def pad(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        out = torch.zeros(rows, cols)
        out[: w.shape[0], : w.shape[1]] = w
        return out

    def heads(w: torch.Tensor, places: list[int], n: int) -> torch.Tensor:  # (n_heads*D, c) rows by head
        out = torch.zeros(n * D, HIDDEN)
        for i, p in enumerate(places):
            out[p * D:(p + 1) * D, :c] = w[i * D:(i + 1) * D]
        return out

    path.mkdir(parents=True)
    writer = SafetensorsWriter(path / "model.safetensors", {"format": "pt"})
    params = 0

    def add(name: str, t: torch.Tensor) -> None:
        nonlocal params
        writer.add(name, t.to(torch.float16).contiguous())
        params += t.numel()

    add("model.embed_tokens.weight", pad(get("model.embed_tokens.weight"), cfg["vocab_size"], HIDDEN))
    for i in range(layers):
        p = f"model.layers.{i}."
        if i < cfg["num_hidden_layers"]:
            add(p + "self_attn.q_proj.weight", heads(get(p + "self_attn.q_proj.weight"), pos, HEADS))
            add(p + "self_attn.k_proj.weight", heads(get(p + "self_attn.k_proj.weight"), list(range(kv)), KV))
            add(p + "self_attn.v_proj.weight", heads(get(p + "self_attn.v_proj.weight"), list(range(kv)), KV))
            o = torch.zeros(HIDDEN, HEADS * D)
            w = get(p + "self_attn.o_proj.weight")
            for j, q in enumerate(pos):
                o[:c, q * D:(q + 1) * D] = w[:, j * D:(j + 1) * D]
            add(p + "self_attn.o_proj.weight", o)
            for name in ("gate_proj", "up_proj"):
                add(p + f"mlp.{name}.weight", pad(get(p + f"mlp.{name}.weight"), FFN, HIDDEN))
            add(p + "mlp.down_proj.weight", pad(get(p + "mlp.down_proj.weight"), HIDDEN, FFN))
            for name in ("input_layernorm", "post_attention_layernorm"):
                g = torch.full((HIDDEN,), norm)
                g[:c] = get(p + f"{name}.weight") * norm
                add(p + f"{name}.weight", g)
            continue
        for name, shape in (("self_attn.q_proj", (HEADS * D, HIDDEN)), ("self_attn.k_proj", (KV * D, HIDDEN)),
                            ("self_attn.v_proj", (KV * D, HIDDEN)), ("mlp.gate_proj", (FFN, HIDDEN)),
                            ("mlp.up_proj", (FFN, HIDDEN))):
            add(p + name + ".weight", torch.randn(shape, generator=gen) * HIDDEN ** -0.5)
        add(p + "self_attn.o_proj.weight", torch.zeros(HIDDEN, HEADS * D))
        add(p + "mlp.down_proj.weight", torch.zeros(HIDDEN, FFN))
        for name in ("input_layernorm", "post_attention_layernorm"):
            add(p + f"{name}.weight", torch.ones(HIDDEN))
    g = torch.full((HIDDEN,), norm)
    g[:c] = get("model.norm.weight") * norm
    add("model.norm.weight", g)
    add("lm_head.weight", pad(get("lm_head.weight"), cfg["vocab_size"], HIDDEN))
    writer.close()
    new = {**cfg, "hidden_size": HIDDEN, "intermediate_size": FFN, "num_attention_heads": HEADS,
           "num_key_value_heads": KV, "num_hidden_layers": layers, "rms_norm_eps": cfg["rms_norm_eps"] / 8,
           "dtype": "float16"}
    new.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(new, indent=2))
    for fp in demo.iterdir():
        if fp.name.startswith(("tokenizer", "special_tokens", "generation")):
            shutil.copy(fp, path / fp.name)
    return params


def check(path: Path) -> float:
    """Max |logit difference| between the padded model and the demo on a code prompt (float32)."""
    from infq.runtime.loader import load_model

    demo, padded = load_model("demo", dtype="float32"), load_model(str(path), dtype="float32")
    ids = torch.tensor([demo.tokenizer("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n").input_ids])
    a, b = demo.model(ids), padded.model(ids)
    return float((a - b).abs().max() / a.abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=22)
    args = p.parse_args()
    n = build(Path(args.out), args.layers)
    print(f"{args.out}: {n / 1e9:.2f} B parameters; logits vs the demo's: max rel diff {check(Path(args.out)):.2e}")


if __name__ == "__main__":
    main()
