"""Speed and memory measurements: process peak RSS, and the serving benchmarks behind `infq bench`.

`peak_rss_bytes` is the high-water mark of this process's resident memory. It reads `VmHWM` from
/proc/self/status where Linux provides it: that belongs to the process's own address space.
`getrusage().ru_maxrss`, the portable fallback, is carried across execve, so a process started
from a large parent (a benchmark that has just built a model, a notebook) would report the
parent's peak instead of its own.

The benchmarks drive the engine directly (no tokenizer; prompts are seeded random token ids):
- `batch_sweep`: B equal requests at once; prefill tokens/s from the first step (every prompt in
  one step), decode tokens/s over the remaining steps, for each B.
- `hf_decode`: transformers `generate` on the same checkpoint, dtype and device at batch 1: decode
  tokens/s = (n - 1) / (time for n tokens - time for 1 token), best of `reps`.
- `make_workload` / `run_workload`: Poisson arrivals with mixed prompt and output lengths replayed
  in real time through the engine, continuously batched or statically batched (`static=True`);
  throughput, TTFT and TPOT percentiles, KV slots in use vs reserved per step, and the waste a
  contiguous max-length preallocation would have on the same trace.
- `prefix_ttft`: TTFT of requests sharing a long system prompt, prefix caching off vs on.
"""

from __future__ import annotations

import random
import resource
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

from infq.errors import InfqError


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024  # kB
        except OSError:
            pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _prompts(n: int, length: int, vocab: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def batch_sweep(model: Any, config: Any, batch_sizes: list[int], prompt_len: int, gen_len: int,
                seed: int = 0) -> list[dict[str, Any]]:
    """Prefill and decode tokens/s for B simultaneous requests of `prompt_len` + `gen_len` tokens."""
    from infq.runtime.engine import Engine

    if prompt_len + gen_len > model.cfg.max_position_embeddings:
        raise InfqError(f"--prompt-len {prompt_len} + --gen-len {gen_len} exceeds the model's context "
                        f"({model.cfg.max_position_embeddings})")
    rng = random.Random(seed)
    rows = []
    Engine(model, replace(config, max_num_seqs=1)).generate(_prompts(1, 8, model.cfg.vocab_size, rng), max_tokens=4)
    for b in batch_sizes:
        ecfg = replace(config, max_num_seqs=b, max_num_batched_tokens=max(b * prompt_len, b), prefix_caching=False)
        eng = Engine(model, ecfg)
        if model.device.type == "cuda":  # autotuning and graph capture for these shapes happen here, untimed
            eng.generate(_prompts(b, prompt_len, model.cfg.vocab_size, rng), max_tokens=gen_len, ignore_eos=True)
        for p in _prompts(b, prompt_len, model.cfg.vocab_size, rng):
            eng.add_request(p, max_tokens=gen_len, ignore_eos=True)
        times = []
        while eng.has_unfinished():
            t = time.perf_counter()
            eng.step()
            times.append(time.perf_counter() - t)
        if eng.scheduler.num_preemptions:
            raise InfqError(f"batch {b} did not fit in the KV budget ({eng.kv.nbytes} bytes); raise --kv-memory")
        decode = sum(times[1:])
        rows.append({"batch_size": b, "prefill_tokens_per_s": b * prompt_len / times[0],
                     "decode_tokens_per_s": b * (gen_len - 1) / decode if decode > 0 else 0.0,
                     "decode_step_ms": 1000 * decode / max(1, len(times) - 1)})
    return rows


def hf_decode(path: str, dtype: Any, device: str, prompt_len: int, gen_len: int, seed: int = 0,
              reps: int = 3) -> dict[str, Any]:
    """transformers greedy `generate` at batch 1 on the same checkpoint: decode tokens/s."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    rng = random.Random(seed)
    ids = torch.tensor(_prompts(1, prompt_len, model.config.vocab_size, rng), device=device)

    def timed(n: int) -> float:
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(2)  # warm-up
    return {"hf_decode_tokens_per_s": _decode_rate(timed, gen_len, reps), "hf_ttft_s": min(timed(1) for _ in range(reps)),
            "transformers": transformers.__version__}


def _decode_rate(timed: Any, gen_len: int, reps: int) -> float | None:
    """(n - 1) / (best time for n tokens - best time for 1); None when noise swamps the difference."""
    one = min(timed(1) for _ in range(reps))
    full = min(timed(gen_len) for _ in range(reps))
    return (gen_len - 1) / (full - one) if full > one else None


def engine_decode_batch1(model: Any, config: Any, prompt_len: int, gen_len: int, seed: int = 0,
                         reps: int = 3) -> float | None:
    """The engine measured exactly as `hf_decode` measures transformers (best of `reps`)."""
    from infq.runtime.engine import Engine

    prompt = _prompts(1, prompt_len, model.cfg.vocab_size, random.Random(seed))
    eng = Engine(model, replace(config, max_num_seqs=1, prefix_caching=False))

    def timed(n: int) -> float:
        t = time.perf_counter()
        eng.generate(prompt, max_tokens=n, ignore_eos=True)
        return time.perf_counter() - t

    timed(2)
    return _decode_rate(timed, gen_len, reps)


@dataclass(frozen=True)
class WorkItem:
    arrival_s: float
    prompt: list[int]
    max_tokens: int


def make_workload(n: int, rate: float, prompt_lens: tuple[int, int], output_lens: tuple[int, int], vocab: int,
                  seed: int = 0) -> list[WorkItem]:
    """`n` requests, Poisson arrivals at `rate` per second, prompt and output lengths uniform in
    the given inclusive ranges."""
    rng = random.Random(seed)
    t, items = 0.0, []
    for _ in range(n):
        items.append(WorkItem(t, _prompts(1, rng.randint(*prompt_lens), vocab, rng)[0], rng.randint(*output_lens)))
        t += rng.expovariate(rate)
    return items


def run_workload(model: Any, config: Any, items: list[WorkItem], warm: bool | None = None) -> dict[str, Any]:
    """Replay `items` in real time through an engine; latency, throughput and KV statistics.
    `warm` (default: on CUDA) first runs the same requests untimed through another engine: the
    Triton autotuners time their configs on the first call of each shape bucket (about a second
    each), which must not land in one mode's timed run and not the other's."""
    from infq.runtime.engine import Engine

    if warm is None:
        warm = model.device.type == "cuda"
    if warm:
        warm_engine = Engine(model, config)
        for w in items:
            warm_engine.add_request(w.prompt, max_tokens=w.max_tokens, ignore_eos=True)
        for _ in warm_engine.stream():
            pass
    eng = Engine(model, config)
    bs, max_len = config.block_size, model.cfg.max_position_embeddings
    pending = sorted(items, key=lambda w: w.arrival_s)
    done: dict[Any, Any] = {}
    steps: list[tuple[int, int, int, bool]] = []  # (used slots, reserved slots, running, queue non-empty)
    t0 = time.perf_counter()
    i = 0
    while i < len(pending) or eng.has_unfinished():
        now = time.perf_counter() - t0
        while i < len(pending) and pending[i].arrival_s <= now:
            eng.add_request(pending[i].prompt, max_tokens=pending[i].max_tokens, ignore_eos=True, request_id=i,
                            arrival=t0 + pending[i].arrival_s)
            i += 1
        if not eng.has_unfinished():
            time.sleep(max(0.0, pending[i].arrival_s - now))
            continue
        outs = eng.step()
        used, reserved = eng.scheduler.kv_usage()
        steps.append((used, reserved, len(eng.scheduler.running), bool(eng.scheduler.waiting)))
        for o in outs:
            if o.finished:
                done[o.request_id] = o
    makespan = time.perf_counter() - t0
    return _summary(done, steps, makespan, eng, bs, max_len)


def _summary(done: dict[Any, Any], steps: list[tuple[int, int, int, bool]], makespan: float, eng: Any,
             bs: int, max_len: int) -> dict[str, Any]:
    outs = list(done.values())
    tokens = sum(len(o.token_ids) for o in outs)
    ttft = [o.ttft_s for o in outs]
    tpot = [(o.e2e_s - o.ttft_s) / (len(o.token_ids) - 1) for o in outs if len(o.token_ids) > 1]
    busy = [s for s in steps if s[1] > 0]
    steady = [s for s in busy if s[3]] or busy  # the queue is non-empty: memory or slots bind
    unused = [1 - s[0] / s[1] for s in steady]
    contiguous = [1 - s[0] / (s[2] * max_len) for s in steady if s[2]]
    budget_tokens = eng.pool.num_blocks * bs
    return {
        "requests": len(outs), "output_tokens": tokens, "makespan_s": makespan,
        "throughput_tokens_per_s": tokens / makespan, "steps": eng.steps,
        "ttft_p50_s": _pct(ttft, 50), "ttft_p95_s": _pct(ttft, 95),
        "tpot_p50_s": _pct(tpot, 50), "tpot_p95_s": _pct(tpot, 95),
        "preemptions": eng.scheduler.num_preemptions,
        "kv_reserved_bytes": eng.kv.nbytes, "kv_budget_tokens": budget_tokens,
        "kv_unused_fraction_steady": statistics.fmean(unused) if unused else 0.0,
        "kv_in_use_fraction_of_pool_steady": statistics.fmean(s[0] / budget_tokens for s in steady) if steady else 0.0,
        "contiguous_unused_fraction_steady": statistics.fmean(contiguous) if contiguous else 0.0,
        "peak_running": max((s[2] for s in steps), default=0),
        "mean_running_steady": statistics.fmean(s[2] for s in steady) if steady else 0.0,
        "contiguous_max_sequences": budget_tokens // max_len,
    }


def prefix_ttft(model: Any, config: Any, system_len: int, suffix_len: int, n: int, seed: int = 0) -> dict[str, Any]:
    """Mean TTFT of `n` sequential requests sharing a `system_len`-token prefix (the first request,
    which fills the cache, excluded), prefix caching off vs on."""
    from infq.runtime.engine import Engine

    rng = random.Random(seed)
    vocab = model.cfg.vocab_size
    system = _prompts(1, system_len, vocab, rng)[0]
    prompts = [system + s for s in _prompts(n + 1, suffix_len, vocab, rng)]
    result: dict[str, Any] = {"system_tokens": system_len, "suffix_tokens": suffix_len, "requests": n}
    for name, on in (("off", False), ("on", True)):
        eng = Engine(model, replace(config, prefix_caching=on, max_num_seqs=1))
        ttfts = [eng.generate([p], max_tokens=2, ignore_eos=True)[0].ttft_s for p in prompts]
        result[f"ttft_{name}_s"] = statistics.fmean(ttfts[1:])
    result["speedup"] = result["ttft_off_s"] / result["ttft_on_s"]
    return result


@dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    prompt_len: int = 64
    gen_len: int = 32
    requests: int = 48
    rate: float = 40.0  # requests per second
    prompt_lens: tuple[int, int] = (16, 128)
    output_lens: tuple[int, int] = (8, 192)
    workload_kv_seqs: float = 8.0  # workload KV budget, in max-context sequences (contiguous fits this many)
    system_len: int = 384
    prefix_requests: int = 4
    hf: bool = True
    workload: bool = True
    prefix: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise InfqError("--batch-sizes needs positive integers, e.g. 1,2,4,8")
        if self.gen_len < 2:
            raise InfqError(f"--gen-len {self.gen_len} must be at least 2 (decode needs a second token)")
        if self.prompt_len < 1 or self.requests < 1 or self.rate <= 0:
            raise InfqError("--prompt-len, --requests and --rate must be positive")
        for name, (lo, hi) in (("--prompt-lens", self.prompt_lens), ("--output-lens", self.output_lens)):
            if not 1 <= lo <= hi:
                raise InfqError(f"{name} {lo}:{hi} must be LO:HI with 1 <= LO <= HI")


def bench(loaded: Any, engine_config: Any, cfg: BenchConfig, device: str,
          progress: Any = None) -> dict[str, Any]:
    """Every measurement of `infq bench` on one loaded model; a JSON-ready dict."""
    model = loaded.model
    say = progress or (lambda _msg: None)
    max_len = model.cfg.max_position_embeddings
    if cfg.prompt_lens[1] + cfg.output_lens[1] > max_len:
        raise InfqError(f"--prompt-lens/--output-lens reach {cfg.prompt_lens[1] + cfg.output_lens[1]} tokens; "
                        f"the model holds {max_len}")
    out: dict[str, Any] = {"model": str(loaded.path), "format": loaded.format, "dtype": str(model.dtype).split(".")[-1],
                           "device": device, "bench": {k: v for k, v in cfg.__dict__.items()},
                           "engine": {k: v for k, v in engine_config.__dict__.items()}}
    say("batch sweep")
    rows = batch_sweep(model, engine_config, list(cfg.batch_sizes), cfg.prompt_len, cfg.gen_len, cfg.seed)
    out["batch_sweep"] = rows
    out["decode_tokens_per_s"] = {str(r["batch_size"]): r["decode_tokens_per_s"] for r in rows}
    out["prefill_tokens_per_s"] = {str(r["batch_size"]): r["prefill_tokens_per_s"] for r in rows}
    say("batch-1 decode, engine vs transformers")
    out["engine_decode_tokens_per_s_batch1"] = engine_decode_batch1(model, engine_config, cfg.prompt_len,
                                                                    cfg.gen_len, cfg.seed)
    if cfg.hf:
        try:
            out.update(hf_decode(str(loaded.path), model.dtype, device, cfg.prompt_len, cfg.gen_len, cfg.seed))
        except Exception as e:  # transformers may not read every format infq does (e.g. GGUF quant types)
            out["hf_decode_tokens_per_s"] = None
            out["hf_error"] = f"{type(e).__name__}: {e}"[:300]
    if cfg.workload:
        from infq.runtime.kv_cache import block_bytes, kv_storage_dtype

        storage = kv_storage_dtype(engine_config.kv_dtype, model.dtype)
        budget = engine_config.kv_memory or int(cfg.workload_kv_seqs * -(-max_len // engine_config.block_size)
                                                * block_bytes(model.cfg, engine_config.block_size, storage))
        items = make_workload(cfg.requests, cfg.rate, cfg.prompt_lens, cfg.output_lens, model.cfg.vocab_size, cfg.seed)
        wcfg = replace(engine_config, kv_memory=budget)
        say("workload, continuous batching")
        out["continuous"] = run_workload(model, wcfg, items)
        say("workload, static batching")
        out["static"] = run_workload(model, replace(wcfg, static=True, max_num_seqs=out["continuous"]["contiguous_max_sequences"] or 1), items)
        out["continuous_over_static"] = (out["continuous"]["throughput_tokens_per_s"]
                                         / out["static"]["throughput_tokens_per_s"])
    if cfg.prefix and cfg.system_len + 16 + 2 <= max_len:
        say("prefix cache TTFT")
        out["prefix_cache"] = prefix_ttft(model, engine_config, cfg.system_len, 16, cfg.prefix_requests, cfg.seed)
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def chart(result: dict[str, Any], path: str) -> str:
    """PNG of prefill and decode tokens/s vs batch size (+ transformers at batch 1)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InfqError("the chart needs matplotlib: pip install 'infq[bench]' (or pass --chart '')") from None
    rows = result["batch_sweep"]
    bs = [r["batch_size"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(bs, [r["decode_tokens_per_s"] for r in rows], "o-", label="infq decode")
    ax.plot(bs, [r["prefill_tokens_per_s"] for r in rows], "s--", label="infq prefill")
    if result.get("hf_decode_tokens_per_s"):
        ax.plot([1], [result["hf_decode_tokens_per_s"]], "r^", markersize=9, label="transformers decode (batch 1)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{result['model'].rstrip('/').split('/')[-1]} ({result['dtype']}, {result['device']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
