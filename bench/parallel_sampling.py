"""Parallel sampling (`infq run --n N`) against N separate requests of the same prompt.

Usage: python bench/parallel_sampling.py [--prompt-len 387] [--new 64] [--ns 2,4,8] [--reps 3]

On the demo model (float32, this machine's device): one request with n = N (the prompt computed
once, N - 1 sequences forked over its KV blocks, copy-on-write of the shared last block) against N
requests with seeds seed + i, with automatic prefix caching on (the engine's default: requests
that arrive together all compute the prompt, since a block is cached only once it is computed) and
off. Reported per mode: wall time (median of --reps), tokens the model computed (prompt + decode),
peak KV blocks in use, copy-on-write block copies, and whether the samples are identical to the
separate requests' (they must be). Writes bench/results/parallel_sampling.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import infq, write  # noqa: F401  (infq: puts the checkout on sys.path)


def run(model, cfg, prompt, n, new, parallel):
    from infq.runtime.engine import Engine, SampleId
    from infq.runtime.sampling import SamplingParams

    eng = Engine(model, cfg)
    stats = {"computed": 0, "peak_blocks": 0, "copies": 0}
    schedule, copy = eng.scheduler.schedule, eng.kv.copy_blocks

    def counting_schedule():
        out = schedule()
        stats["computed"] += out.total_tokens
        return out

    def counting_copy(pairs):
        stats["copies"] += len(pairs)
        copy(pairs)

    eng.scheduler.schedule, eng.kv.copy_blocks = counting_schedule, counting_copy
    params = [SamplingParams(temperature=0.8, top_k=50, seed=100 + i) for i in range(n)]
    start = time.perf_counter()
    if parallel:
        eng.add_request(prompt, params[0], new, ignore_eos=True, request_id=0, n=n)
    else:
        for i in range(n):
            eng.add_request(prompt, params[i], new, ignore_eos=True, request_id=i)
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id.index if isinstance(o.request_id, SampleId) else o.request_id] = o.token_ids
        stats["peak_blocks"] = max(stats["peak_blocks"], eng.pool.num_blocks - eng.pool.num_free)
    stats["seconds"] = time.perf_counter() - start
    return [done[i] for i in range(n)], stats


def main() -> None:
    import torch

    from infq.runtime.engine import EngineConfig, default_block_size
    from infq.runtime.loader import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-len", type=int, default=387)  # ends inside a block: copy-on-write
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--ns", default="2,4,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    loaded = load_model("demo", device=args.device, serving=True)
    model = loaded.model
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, model.cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
    bs = default_block_size(args.device)
    rows = []
    for n in [int(x) for x in args.ns.split(",")]:
        row = {"n": n}
        reference = None
        for mode, parallel, caching in (("parallel", True, True), ("separate_prefix_cache", False, True),
                                        ("separate_no_cache", False, False)):
            cfg = EngineConfig(block_size=bs, prefix_caching=caching, kv_memory=64 << 20)
            run(model, cfg, prompt, n, 4, parallel)  # warm-up
            reps = [run(model, cfg, prompt, n, args.new, parallel) for _ in range(args.reps)]
            samples, stats = reps[0]
            stats["seconds"] = statistics.median(r[1]["seconds"] for r in reps)
            if reference is None:
                reference = samples
            stats["same_samples"] = samples == reference
            row[mode] = stats
            print(f"n={n} {mode:22s} {stats['seconds'] * 1e3:8.1f} ms  computed {stats['computed']:5d} tokens  "
                  f"peak blocks {stats['peak_blocks']:4d}  copies {stats['copies']}  same {stats['same_samples']}")
        row["speedup_vs_separate"] = row["separate_prefix_cache"]["seconds"] / row["parallel"]["seconds"]
        rows.append(row)
    write("parallel_sampling.json", {"prompt_len": args.prompt_len, "new_tokens": args.new, "block_size": bs,
                                     "device": args.device, "rows": rows})


if __name__ == "__main__":
    main()
