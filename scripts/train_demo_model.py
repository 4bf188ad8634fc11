"""Train the bundled demo model (infq/assets/demo): a small Llama with its own tokenizer.

The model is a transformers `LlamaForCausalLM` (hidden 256, 4 layers, 4 heads / 2 KV heads of
dim 64, MLP 768, vocab 4096) trained from scratch on the `demo` calibration split of
infq.eval.datasets (the running interpreter's standard-library sources), so tests, examples and
benchmarks have a real, offline, trained checkpoint whose every in-dim is a multiple of 256.
Its tokenizer is a Llama-2-style byte-fallback BPE (`<unk>`, `<s>`, `</s>`, 256 `<0xNN>` bytes,
then merges; no pre-tokenizer) trained on the same split with the `tokenizers` library.

Run from the repository root:  python scripts/train_demo_model.py [--out DIR] [--steps N] [--seed S]
With the default 1000 steps it takes about 11 minutes on 2 CPU cores (torch threads fixed at 2).
It logs the training loss every 45 steps, then reloads the saved float16 checkpoint, checks the
tokenizer round-trips stdlib code through `AutoTokenizer`, prints the perplexity on the demo
eval split (non-overlapping 512-token windows, at most 100, float32) next to the uniform-guess
perplexity (the vocabulary size, 4096), and writes those figures to DIR/TRAINING.md.
Deterministic given the seed, the Python version (the corpus is its stdlib) and the library
versions; CPU only.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from infq.eval.datasets import eval_tokens, load_records, load_text

VOCAB = 4096
SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Llama-2; bytes <0x00>..<0xFF> are 3..258
MODEL = dict(
    vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
    rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
    eos_token_id=2, hidden_act="silu", initializer_range=0.02,
)  # fmt: skip
# Training splits only: words, punctuation runs and whitespace runs (spaces are "▁" by then).
TRAIN_SPLIT = r"▁?[A-Za-z_0-9]+|▁?[^A-Za-z_0-9▁\n]+|▁+(?=▁)|▁+|\n+"
ROUND_TRIP = (
    "def f(self, x):\n    return {'a': x}  # note\n",
    "\tif a:\n\t\tb = 'ünïcödé ∑ 😀'\r\n",
    "  leading and trailing spaces  \n\n\n",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="infq/assets/demo", help="output directory")
    p.add_argument(
        "--steps", type=int, default=1000, help="optimizer steps (~0.65 s each on 2 cores)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512, help="training context; also the config's max_position_embeddings")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def build_tokenizer(records: list[str]):
    """Llama-2-style byte-fallback BPE with VOCAB ids, trained on `records`."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainee = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainee.normalizer = normalizer
    # Merges never cross a word/space boundary while training, like sentencepiece's pieces.
    trainee.pre_tokenizer = pre_tokenizers.Split(Regex(TRAIN_SPLIT), behavior="isolated")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 256, special_tokens=list(SPECIALS), limit_alphabet=160,
        show_progress=False,
    )  # fmt: skip
    trainee.train_from_iterator(records, trainer)
    trained = json.loads(trainee.to_str())["model"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for tok, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    assert len(vocab) == VOCAB, len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def save_tokenizer(tok, out: Path):
    """tokenizer.json + configs; returns the tokenizer as `AutoTokenizer` loads it back."""
    from transformers import AutoTokenizer

    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    # PreTrainedTokenizerFast loads tokenizer.json verbatim; transformers 5's LlamaTokenizer
    # rebuilds its own pre-tokenizer and changes the ids of leading spaces.
    config = dict(
        tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True, add_eos_token=False,
        model_max_length=MODEL["max_position_embeddings"], clean_up_tokenization_spaces=False,
        **special,
    )  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    loaded = AutoTokenizer.from_pretrained(str(out))
    for text in ROUND_TRIP + (load_text("demo", "eval")[:5000],):
        ids = loaded(text).input_ids
        assert ids == tok.encode(text).ids and ids[0] == 1, "AutoTokenizer ids differ"
        assert loaded.decode(ids, skip_special_tokens=True) == text, f"round trip: {text!r}"
    return loaded


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warmup over 5% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, ids: torch.Tensor, args: argparse.Namespace) -> list[tuple[int, float, float]]:
    """AdamW on random `seqlen` windows of `ids` (N,); returns (step, loss, seconds) logs."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(args.seqlen)  # (T,)
    log, t0, every = [], time.time(), max(1, args.steps // 22)
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, ids.numel() - args.seqlen, (args.batch,), generator=gen)  # (B,)
        x = ids[starts[:, None] + offsets]  # (B, T)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % every == 0 or step == args.steps - 1:
            log.append((step, loss.item(), time.time() - t0))
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.time() - t0:6.0f}s", flush=True)
    return log


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, max_windows: int = 100) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping `seqlen` windows of `ids` (N,); (ppl, windows)."""
    n = min(max_windows, ids.numel() // seqlen)
    windows = ids[: n * seqlen].view(n, seqlen)  # (W, T)
    model.eval()
    nll = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(nll) / n), n  # every window scores the same seqlen - 1 tokens


def write_report(out: Path, args, figures: dict, log) -> None:
    curve = ", ".join(f"{s}: {loss:.2f}" for s, loss, _ in log)
    text = f"""# Demo model: how it was trained

Made by `python scripts/train_demo_model.py --steps {args.steps} --seed {args.seed}` (see its
docstring). Llama architecture: {json.dumps({k: MODEL[k] for k in list(MODEL)[:8]})}.
Tokenizer: Llama-2-style byte-fallback BPE, vocab {VOCAB}, trained on the same text.

| | |
|---|---|
| training text | `demo` calib split (Python {figures["python"]} stdlib sources), {figures["train_tokens"]:,} tokens |
| steps x batch x seqlen | {args.steps} x {args.batch} x {args.seqlen} ({args.steps * args.batch * args.seqlen:,} tokens seen) |
| optimizer | AdamW lr {args.lr:g}, betas (0.9, 0.95), weight decay 0.1, 5% warmup, cosine to 10%, clip 1.0 |
| machine | {figures["machine"]}, torch {torch.__version__}, {args.threads} threads |
| training wall time | {figures["train_s"] / 60:.1f} min (whole script {figures["total_s"] / 60:.1f} min) |
| **eval perplexity** | **{figures["ppl"]:.2f}** on the `demo` eval split ({figures["windows"]} x {args.seqlen}-token windows, float32 from the float16 checkpoint) |
| uniform-guess perplexity | {VOCAB} |
| size on disk | {figures["size_mb"]:.1f} MB (float16 safetensors + tokenizer) |

Training loss by step: {curve}.
"""
    (out / "TRAINING.md").write_text(text)


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    args = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = save_tokenizer(build_tokenizer(load_records("demo", "calib")), out)
    ids = torch.tensor(tokenizer(load_text("demo", "calib"), verbose=False).input_ids)  # (N,)
    print(f"tokenizer: {len(tokenizer)} ids; calib text {ids.numel():,} tokens", flush=True)

    # The model is trained at one context length and declares it, so every tool caps windows there.
    model = LlamaForCausalLM(LlamaConfig(**{**MODEL, "max_position_embeddings": args.seqlen})).float()
    t_train = time.time()
    log = train(model, ids, args)
    train_s = time.time() - t_train
    model.config.dtype = torch.float16
    model.to(torch.float16).save_pretrained(str(out))

    shipped = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ppl, windows = perplexity(shipped, eval_tokens(tokenizer, "demo"), args.seqlen)
    size_mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6
    figures = dict(
        ppl=ppl, windows=windows, train_s=train_s, total_s=time.time() - t_start,
        size_mb=size_mb, train_tokens=ids.numel(), python=platform.python_version(),
        machine=f"{platform.machine()} CPU, {platform.system()}",
    )  # fmt: skip
    write_report(out, args, figures, log)
    print(f"eval perplexity {ppl:.2f} (uniform guess {VOCAB}); trained {train_s / 60:.1f} min;"
          f" {size_mb:.1f} MB in {out}")  # fmt: skip
    if size_mb > 20:
        sys.exit(f"checkpoint is {size_mb:.1f} MB, over the 20 MB budget")


if __name__ == "__main__":
    main()
