"""Speculative decoding on the demo model (or `--model`): acceptance, tokens per target step, wall-clock speedup.

    python bench/speculative_bench.py                       # CPU, drafts: ngram, RTN 3/2-bit, GPTQ 3-bit
    python bench/speculative_bench.py --device cuda --dtype bfloat16 --name cuda
    python bench/speculative_bench.py --quick               # one rep, 24 tokens, to check that it runs
    python bench/padded_demo.py /tmp/p1b && python bench/speculative_bench.py --model /tmp/p1b \
        --dtype bfloat16 --drafts ngram,rtn3 --draft-dtypes auto --name padded1b   # a 1B model's costs

`--model` sets the target (default the demo). bench/padded_demo.py writes the demo embedded in
TinyLlama-1.1B's shape: the demo's predictions (so the same acceptance) at a memory-bound 1B model's
cost per token, where a draft quantized to 3 bits reads a fifth of the target's bf16 bytes.

Quantized-self drafts are made here with `infq quantize` (RTN 3- and 2-bit g128, GPTQ 3-bit g128
on the demo calibration split; `q3km`, llama.cpp's Q3_K_M mix as GGUF, also accepted by --drafts);
`ngram` is prompt lookup. Prompt sets (`--sets`, default both): `code`, eight short
repetitive Python snippets (infq.eval.spec_bench.CODE_PROMPTS); `prose`, the first eight long
lines of wikitext-2's test split (--prose-file), cut to ~300 characters. Each (draft, set) is run
one prompt at a time (batch 1) and as one continuous batch, greedy, `--max-new-tokens` each with EOS
ignored, plain and speculative, warm, fastest of `--reps`. Model drafts run in the target's dtype
and in bfloat16 (`--draft-dtypes`): on a CPU, bf16 runs the packed 1-8-bit weights on aten's
int4pack kernels, which read a quarter of the bytes fp32 does. Writes bench/results/speculative[_NAME].json
with the formula (1 - a^(K+1)) / (1 - a) beside each measured tokens-per-step and the draft's cost
ratio c (one draft pass / one plain step).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import infq, write

DRAFTS = {"rtn3": ["--method", "rtn", "--bits", "3"], "rtn2": ["--method", "rtn", "--bits", "2"],
          "gptq3": ["--method", "gptq", "--bits", "3"], "q3km": ["--method", "kquant", "--type", "Q3_K_M"]}
PROSE = "/work/shared/data/wikitext-2-raw/wiki.test.raw"


def make_drafts(names: list[str], work: Path, model: str = "demo") -> dict[str, str]:
    out = {}
    stem = Path(model).name
    for name in names:
        if name == "ngram":
            out[name] = "ngram"
            continue
        path = work / (f"{stem}-{name}.gguf" if DRAFTS[name][1] == "kquant" else f"{stem}-{name}")
        if not path.exists():
            start = time.perf_counter()
            infq("quantize", "--model", model, *DRAFTS[name], "--out", path, "--force")
            print(f"draft {name}: quantized in {time.perf_counter() - start:.0f} s", flush=True)
        out[name] = str(path)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="the target (default the demo; see bench/padded_demo.py)")
    p.add_argument("--drafts", default="ngram,rtn3,gptq3,rtn2")
    p.add_argument("--num-draft", default="4", help="K, or auto")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--draft-dtypes", default="auto,bfloat16",
                   help="each model draft in each of these dtypes (auto: the target's --dtype)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--prose-file", default=PROSE)
    p.add_argument("--work", default=None, help="where the draft checkpoints go (default: a temp dir)")
    p.add_argument("--name", default="", help="results file suffix: speculative_NAME.json")
    p.add_argument("--sets", default="code,prose", help="prompt sets to run: code, prose or both")
    p.add_argument("--draft-prefill", choices=("target", "own"), default="target",
                   help="a draft laid out as the target takes the target's prompt K/V (default), or prefills itself")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    import torch

    from infq.eval.spec_bench import CODE_PROMPTS, bench_draft, text_prompts
    from infq.runtime.engine import EngineConfig
    from infq.runtime.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    reps, tokens = (1, 24) if args.quick else (args.reps, args.max_new_tokens)
    work = Path(args.work or tempfile.mkdtemp(prefix="infq-spec-"))
    drafts = make_drafts(args.drafts.split(","), work, args.model)
    target = load_model(args.model, dtype=args.dtype, device=args.device, serving=True)
    sets = {name: CODE_PROMPTS if name == "code" else text_prompts(args.prose_file) for name in args.sets.split(",")}
    config = EngineConfig(kv_memory=64 * 2**20)
    rows, overall = [], {}
    for name, draft in drafts.items():
        for ddt in ["auto"] if draft == "ngram" else args.draft_dtypes.split(","):
            ddt = args.dtype if ddt == "auto" else ddt
            label = name if ddt == args.dtype else f"{name}-{ddt}"
            r = bench_draft(target, config, draft, args.num_draft, sets, tokens, reps, ddt, args.device,
                            progress=lambda row, n=label: _line(n, row), share_kv=args.draft_prefill == "target")
            rows += [{**row, "draft": label, "draft_dtype": ddt} for row in r.pop("rows")]
            overall[label] = r
    out = write(f"speculative{'_' + args.name if args.name else ''}.json", {
        "model": args.model, "device": args.device, "dtype": str(target.model.dtype), "num_draft": args.num_draft,
        "draft_prefill": args.draft_prefill,
        "max_new_tokens": tokens, "reps": reps, "greedy": True, "prompt_sets": sets, "overall": overall, "rows": rows})
    print(f"wrote {out}")


def _line(name: str, row: dict) -> None:
    print(f"{name:>15} {row['prompt_set']:>5} {'batched' if row['batched'] else 'batch-1':>7}: acceptance "
          f"{row['acceptance_rate']:.2f}, {row['tokens_per_target_step']:.2f} tokens/step (formula "
          f"{row['formula_tokens_per_target_step']:.2f} at K={row['mean_num_draft']:.2f}), c "
          f"{row.get('draft_cost_ratio', 0):.2f}, speedup {row['speedup']:.2f}x, matches plain {row.get('matches_plain')}",
          flush=True)


if __name__ == "__main__":
    main()
