"""Speculative decoding measured against plain decoding on the same prompts: `infq bench --draft`.

For a prompt set, the same prompts run plainly and with the speculator, one prompt at a time
(batch 1) and all together (continuous batching), each warm and timed `reps` times (the fastest
run counts, which discounts interference from other processes). Reported per row: acceptance rate,
tokens per target step, mean drafts per step, the formula (1 - a^(K+1)) / (1 - a) at the measured
a and K, the draft's cost per pass relative to a plain step (c), wall-clock speedup, and for
greedy decoding whether the outputs equal plain decoding's (they must, up to the rounding of
kernels whose results depend on the number of rows: where they differ, `greedy_divergences` gives
the logit gap at the first differing token, and batched rows say whether plain decoding itself
gave the same tokens alone and batched). `CODE_PROMPTS` are short
repetitive Python snippets; `text_prompts` cuts prompts from a local text file (e.g. wikitext).
`compare_with_plain` is what `infq run --draft` reports after its run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from infq.errors import InfqError

CODE_PROMPTS = [
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n    def __repr__(self):\n"
    "        return f\"Point({self.x}, {self.y})\"\n\n\nclass Vector:\n    def __init__(self, x, y):\n",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n",
    "import os\nimport sys\nimport json\n\n\ndef read_json(path):\n    with open(path) as f:\n        return json.load(f)"
    "\n\n\ndef write_json(path, data):\n",
    "    def test_add(self):\n        self.assertEqual(add(1, 2), 3)\n\n    def test_sub(self):\n"
    "        self.assertEqual(sub(3, 2), 1)\n\n    def test_mul(self):\n",
    "COLORS = {\n    'red': (255, 0, 0),\n    'green': (0, 255, 0),\n    'blue': (0, 0, 255),\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n\nfor j in range(10):\n",
    "    @property\n    def name(self):\n        return self._name\n\n    @name.setter\n    def name(self, value):\n"
    "        self._name = value\n\n    @property\n    def size(self):\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser()\n"
    "    parser.add_argument('--input', type=str, default=None)\n    parser.add_argument('--output', type=str, default=None)\n",
]


def text_prompts(path: str | Path, n: int = 8, chars: int = 300, min_chars: int = 200) -> list[str]:
    """The first `n` lines of a text file with at least `min_chars` characters (headings and
    short lines skipped), each cut to about `chars` characters at a word boundary."""
    p = Path(path)
    if not p.is_file():
        raise InfqError(f"{p}: no such prompts file")
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if len(line) < min_chars or line.startswith("="):
            continue
        out.append(line[:chars].rsplit(" ", 1)[0])
        if len(out) == n:
            break
    if not out:
        raise InfqError(f"{p} has no line of {min_chars} characters or more to use as a prompt")
    return out


def _timed(make_engine: Callable[[], Any], prompts: list[list[int]], batched: bool, max_tokens: int,
           params: Any, reps: int) -> tuple[float, list[list[int]], Any, int]:
    """Fastest of `reps` warm runs: (seconds, outputs, the engine of the last run, its timed steps)."""
    best, outputs, engine, steps = float("inf"), [], None, 0
    for _ in range(reps):
        engine = make_engine()
        warm_up(engine, prompts[0])
        first = engine.steps
        start = time.perf_counter()
        groups = [prompts] if batched else [[p] for p in prompts]
        outputs = [o.token_ids for g in groups for o in engine.generate(g, params, max_tokens, ignore_eos=True)]
        best = min(best, time.perf_counter() - start)
        steps = engine.steps - first
    return best, outputs, engine, steps


def compare(target: Any, engine_config: Any, speculator: Callable[[Any], Any], prompts: Sequence[str],
            max_tokens: int = 64, batched: bool = False, params: Any = None, reps: int = 3) -> dict[str, Any]:
    """One row: the prompts decoded plainly and with `speculator(engine)` attached."""
    from infq.runtime.engine import Engine
    from infq.runtime.sampling import SamplingParams
    from infq.runtime.speculative import expected_tokens

    params = params or SamplingParams()
    ids = [target.tokenizer(p).input_ids for p in prompts]

    def plain() -> Any:
        return Engine(target.model, engine_config)

    def spec() -> Any:
        engine = Engine(target.model, engine_config)
        engine.speculator = speculator(engine)
        return engine

    plain_s, plain_out, _, plain_steps = _timed(plain, ids, batched, max_tokens, params, reps)
    spec_s, spec_out, spec_engine, spec_steps = _timed(spec, ids, batched, max_tokens, params, reps)
    report = spec_engine.speculator.report()
    tokens = sum(len(o) for o in spec_out)
    passes = report["draft_passes"]
    row = {**report, "batched": batched, "prompts": len(prompts), "generated_tokens": tokens,
           "plain_seconds": plain_s, "speculative_seconds": spec_s, "speedup": plain_s / spec_s,
           "plain_engine_steps": plain_steps, "speculative_engine_steps": spec_steps,
           "plain_tokens_per_s": tokens / plain_s, "speculative_tokens_per_s": tokens / spec_s}
    a, k = row["acceptance_rate"], row["mean_num_draft"]
    row["formula_tokens_per_target_step"] = expected_tokens(a, k)
    if passes:  # seconds of one draft pass over a plain step (both from the timed runs' engines)
        row["draft_cost_ratio"] = (row["draft_seconds"] / passes) / (plain_s / max(plain_steps, 1))
    if params.temperature == 0:
        row["plain_outputs"] = plain_out  # bench_draft compares batch 1 with batched plain decoding
        row["matches_plain"] = spec_out == plain_out
        row["prompts_matching"] = sum(a == b for a, b in zip(spec_out, plain_out, strict=True))
        row["greedy_divergences"] = divergences(target.model, ids, plain_out, spec_out)
    return row


def divergences(model: Any, prompts: list[list[int]], plain: list[list[int]], spec: list[list[int]]) -> list[dict]:
    """Where speculative greedy output leaves plain greedy output: per differing prompt, the first
    differing position, both tokens, and the gap between their logits in a third pass (the whole
    prefix at once). A gap at the scale of the compute dtype's rounding marks a near-tie that the
    (K+1)-token verification rounded the other way; a large gap would be a bug."""
    import torch

    out = []
    for i, (p, a, b) in enumerate(zip(prompts, plain, spec, strict=True)):
        j = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if j is None:
            continue
        logits = model(torch.tensor([p + a[:j]]))[0, -1].float()  # (V,) after the common prefix
        out.append({"prompt": i, "position": j, "plain_token": a[j], "speculative_token": b[j],
                    "logit_gap": float(logits[a[j]] - logits[b[j]]), "top_logit": float(logits.max())})
    return out


def bench_draft(target: Any, engine_config: Any, draft: str, num_draft: str, prompt_sets: dict[str, Sequence[str]],
                max_tokens: int = 64, reps: int = 3, dtype: str = "auto", device: str = "cpu",
                progress: Callable[[dict[str, Any]], None] | None = None, share_kv: bool = True) -> dict[str, Any]:
    """`infq bench --draft`: `compare` for every prompt set, batch 1 and batched; the top-level
    figures pool all rows (acceptance = accepted / drafted, tokens per target step = tokens /
    verifications, speedup = plain seconds / speculative seconds). `dtype` is the draft's;
    `share_kv`: see `build_speculator`."""
    from infq.runtime.speculative import build_speculator

    rows = []
    for name, prompts in prompt_sets.items():
        for batched in (False, True):
            row = compare(target, engine_config,
                          lambda e: build_speculator(e, target, draft, num_draft, dtype, device, share_kv),
                          prompts, max_tokens, batched, reps=reps)
            row["prompt_set"] = name
            rows.append(row)
            if progress is not None:
                progress(row)
        plain = [r.pop("plain_outputs", None) for r in rows[-2:]]
        if plain[0] is not None:  # is the target's own greedy output the same alone and batched?
            rows[-1]["plain_matches_batch_1"] = plain[0] == plain[1]
    drafted = sum(r["drafted_tokens"] for r in rows)
    steps = sum(r["target_steps"] for r in rows)
    emitted = sum(r["tokens_per_target_step"] * r["target_steps"] for r in rows)
    return {"draft": draft, "draft_dtype": dtype, "num_draft": num_draft, "max_new_tokens": max_tokens, "reps": reps,
            "acceptance_rate": sum(r["accepted_tokens"] for r in rows) / drafted if drafted else 0.0,
            "tokens_per_target_step": emitted / steps if steps else 0.0,
            "speedup": sum(r["plain_seconds"] for r in rows) / sum(r["speculative_seconds"] for r in rows),
            "matches_plain": all(r.get("matches_plain", True) for r in rows), "rows": rows}


def warm_up(engine: Any, prompt_ids: Sequence[int], tokens: int = 4) -> None:
    """A short generation through `engine` (and its draft) so that timed runs start warm (first
    calls allocate and page in); the speculator's counts start again after it."""
    from infq.runtime.speculative import SpecStats

    engine.generate([list(prompt_ids)], max_tokens=tokens, ignore_eos=True)
    if engine.speculator is not None:
        engine.speculator.stats = SpecStats()


def compare_with_plain(engine: Any, prompts: Sequence[Any], results: list[dict], seconds: float,
                       max_new_tokens: int, params: Any, **kwargs: Any) -> dict[str, Any]:
    """The speculator's figures for a finished `run_prompts` over `engine` (which took `seconds`),
    and the same prompts decoded plainly by a fresh engine over the same model: wall-clock speedup,
    and for greedy runs whether the token ids are identical (they must be)."""
    from infq.runtime.chat import encode_text
    from infq.runtime.engine import Engine
    from infq.runtime.generate import run_prompts

    report = engine.speculator.report()
    plain = Engine(engine.model, engine.config, eos_ids=sorted(engine.eos_ids), tokenizer=engine.tokenizer)
    encode = kwargs.get("encode") or (lambda p: encode_text(engine.tokenizer, p))
    warm_up(plain, encode(prompts[0]))
    start = time.perf_counter()
    baseline = run_prompts(plain, prompts, max_new_tokens, params, **kwargs)
    plain_seconds = time.perf_counter() - start
    report.update(speculative_seconds=seconds, plain_seconds=plain_seconds,
                  speedup=plain_seconds / seconds if seconds > 0 else 0.0)
    if params.temperature == 0:
        report["matches_plain"] = [r.get("token_ids") for r in results] == [r.get("token_ids") for r in baseline]
    return report
