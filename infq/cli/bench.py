"""`infq bench`: serving throughput of the engine on one model, with transformers as the baseline.

Prefill and decode tokens/s at each batch size; a Poisson workload with mixed lengths run with
continuous batching and with static batching; batch-1 decode vs transformers `generate`; prefix
cache TTFT; KV memory in use vs reserved. `--json` prints one object; `--chart` writes a PNG.
"""

from __future__ import annotations

import typer

from infq.cli.common import cli_errors, print_json, stderr_console


def _ints(text: str, name: str) -> tuple[int, ...]:
    from infq.errors import InfqError

    try:
        return tuple(int(x) for x in text.replace(":", ",").split(",") if x.strip())
    except ValueError:
        raise InfqError(f"{name} {text!r}: expected integers such as 1,2,4,8 (or LO:HI for a range)") from None


def bench(
    model: str = typer.Argument("demo", help="Model directory, hub id, or 'demo'."),
    batch_sizes: str = typer.Option("1,2,4,8,16,32", "--batch-sizes", help="Batch sizes of the sweep."),
    prompt_len: int = typer.Option(64, "--prompt-len", help="Prompt tokens per request in the sweep."),
    gen_len: int = typer.Option(32, "--gen-len", help="Generated tokens per request in the sweep."),
    requests: int = typer.Option(48, "--requests", help="Requests in the variable-length workload."),
    rate: float = typer.Option(40.0, "--rate", help="Workload arrivals per second (Poisson)."),
    prompt_lens: str = typer.Option("16:128", "--prompt-lens", help="Workload prompt lengths LO:HI (uniform)."),
    output_lens: str = typer.Option("8:192", "--output-lens", help="Workload output lengths LO:HI (uniform)."),
    workload_kv_seqs: float = typer.Option(8.0, "--workload-kv-seqs", help="Workload KV budget in full-context sequences (when --kv-memory is auto)."),
    system_len: int = typer.Option(384, "--system-len", help="Shared system-prompt tokens for the prefix-cache TTFT test."),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompts and the workload."),
    no_hf: bool = typer.Option(False, "--no-hf", help="Skip the transformers baseline."),
    no_workload: bool = typer.Option(False, "--no-workload", help="Skip the continuous/static workload."),
    no_prefix: bool = typer.Option(False, "--no-prefix", help="Skip the prefix-cache TTFT test."),
    kv_memory: str = typer.Option("auto", "--kv-memory", help="KV cache budget, e.g. 256MiB."),
    kv_dtype: str = typer.Option("auto", "--kv-dtype", help="KV cache storage: auto, int8, fp8."),
    block_size: int = typer.Option(None, "--block-size", help="Tokens per KV block \\[default: 8 on a CPU, 16 on CUDA]."),
    max_num_seqs: int = typer.Option(64, "--max-num-seqs", help="Requests running at once at most (workload)."),
    max_batched_tokens: int = typer.Option(512, "--max-batched-tokens", help="Tokens per engine step (workload)."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="Replay decode steps as CUDA graphs (captured per batch-size bucket on first use; cuts launch overhead on a GPU)."),
    chart: str = typer.Option("infq-bench.png", "--chart", help="PNG of tokens/s vs batch size ('' for none)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (CPU: fp32, or bf16 for integer-quantized weights; GPU: the checkpoint's half type), float32, bfloat16, float16."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    draft: str = typer.Option(None, "--draft", help="Instead: speculative vs plain decoding with this draft (a checkpoint sharing the tokenizer, or 'ngram')."),
    num_draft: str = typer.Option("4", "--num-draft", help="Draft tokens per step with --draft: K >= 1, or 'auto'."),
    draft_dtype: str = typer.Option(None, "--draft-dtype", help="With --draft: the draft's dtype (default: --dtype)."),
    spec_prompts: str = typer.Option(None, "--spec-prompts", help="With --draft: a text file whose long lines make a second prompt set ('text') beside the built-in code prompts."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Measure throughput. Example: infq bench demo --batch-sizes 1,4,16 --json"""
    with cli_errors():
        from infq.errors import InfqError
        from infq.eval.throughput import BenchConfig
        from infq.eval.throughput import bench as run_bench
        from infq.eval.throughput import chart as draw
        from infq.runtime.engine import EngineConfig, default_block_size
        from infq.runtime.kv_cache import parse_memory
        from infq.runtime.loader import load_model

        if cuda_graphs and not device.startswith("cuda"):
            raise InfqError("--cuda-graphs needs --device cuda (CUDA graphs replay GPU work; drop the flag on a CPU)")
        plens, olens = _ints(prompt_lens, "--prompt-lens"), _ints(output_lens, "--output-lens")
        if len(plens) != 2 or len(olens) != 2:
            raise InfqError("--prompt-lens and --output-lens take LO:HI, e.g. 16:128")
        cfg = BenchConfig(_ints(batch_sizes, "--batch-sizes"), prompt_len, gen_len, requests, rate, plens, olens,
                          workload_kv_seqs, system_len, hf=not no_hf, workload=not no_workload,
                          prefix=not no_prefix, seed=seed)
        ecfg = EngineConfig(block_size=default_block_size(device) if block_size is None else block_size,
                            kv_memory=None if kv_memory == "auto" else parse_memory(kv_memory),
                            kv_dtype=kv_dtype, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched_tokens,
                            cuda_graphs=cuda_graphs)
        console = stderr_console()
        if draft is not None:
            _bench_draft(model, ecfg, draft, num_draft, spec_prompts, gen_len, dtype, draft_dtype or dtype, device,
                         json_out, console)
            return
        loaded = load_model(model, dtype=dtype, device=device, tokenizer=False, serving=True)
        result = run_bench(loaded, ecfg, cfg, device, progress=lambda m: console.print(f"[dim]{m}...[/]"))
        result["chart"] = draw(result, chart) if chart else None
        if json_out:
            print_json(result)
            return
        _print(result)


def _bench_draft(model, ecfg, draft, num_draft, spec_prompts, gen_len, dtype, draft_dtype, device, json_out,
                 console) -> None:
    """Speculative decoding vs plain decoding (infq.eval.spec_bench), one row per prompt set and batching."""
    from infq.eval.spec_bench import CODE_PROMPTS, bench_draft, text_prompts
    from infq.runtime.loader import load_model
    from infq.runtime.speculative import parse_num_draft

    parse_num_draft(num_draft)
    sets = {"code": CODE_PROMPTS, **({"text": text_prompts(spec_prompts)} if spec_prompts else {})}
    target = load_model(model, dtype=dtype, device=device, serving=True)
    r = bench_draft(target, ecfg, draft, num_draft, sets, gen_len, dtype=draft_dtype, device=device,
                    progress=lambda row: console.print(f"[dim]{row['prompt_set']} {'batched' if row['batched'] else 'batch 1'} done...[/]"))
    if json_out:
        print_json({"model": model, **r})
        return
    typer.echo(f"{model} with draft {draft} (K={num_draft}), {gen_len} tokens per prompt, greedy")
    for row in r["rows"]:
        typer.echo(f"  {row['prompt_set']:>5} {'batched' if row['batched'] else 'batch 1':>7}: acceptance "
                   f"{row['acceptance_rate']:.2f}, {row['tokens_per_target_step']:.2f} tokens/target step (formula "
                   f"{row['formula_tokens_per_target_step']:.2f}), speedup {row['speedup']:.2f}x, "
                   f"outputs {'equal' if row.get('matches_plain', True) else 'DIFFER'}")
    typer.echo(f"  overall: acceptance {r['acceptance_rate']:.2f}, {r['tokens_per_target_step']:.2f} tokens per "
               f"target step, {r['speedup']:.2f}x plain decoding")


def _print(r: dict) -> None:
    echo = typer.echo
    echo(f"{r['model']} ({r['format']}, {r['dtype']}, {r['device']})")
    for row in r["batch_sweep"]:
        echo(f"  batch {row['batch_size']:>3}: prefill {row['prefill_tokens_per_s']:9.1f} tok/s   "
             f"decode {row['decode_tokens_per_s']:9.1f} tok/s")
    hf = r.get("hf_decode_tokens_per_s")
    ours = r["engine_decode_tokens_per_s_batch1"]
    echo("  batch-1 decode: infq " + (f"{ours:.1f} tok/s" if ours else "n/a (timing noise)") + ", transformers "
         + (f"{hf:.1f} tok/s" if hf else f"n/a ({r.get('hf_error', 'skipped or timing noise')})"))
    for name in ("continuous", "static"):
        if name in r:
            w = r[name]
            echo(f"  {name:>10}: {w['throughput_tokens_per_s']:8.1f} tok/s  TTFT p50/p95 {w['ttft_p50_s'] * 1e3:.0f}/"
                 f"{w['ttft_p95_s'] * 1e3:.0f} ms  TPOT p50/p95 {w['tpot_p50_s'] * 1e3:.1f}/{w['tpot_p95_s'] * 1e3:.1f} ms  "
                 f"KV unused {w['kv_unused_fraction_steady']:.1%}  peak running {w['peak_running']}")
    if "continuous_over_static" in r:
        c = r["continuous"]
        echo(f"  continuous / static: {r['continuous_over_static']:.2f}x; contiguous max-length preallocation would "
             f"leave {c['contiguous_unused_fraction_steady']:.1%} unused and fit {c['contiguous_max_sequences']} "
             f"sequences (paged: peak {c['peak_running']}, mean {c['mean_running_steady']:.1f})")
    if "prefix_cache" in r:
        p = r["prefix_cache"]
        echo(f"  prefix cache TTFT ({p['system_tokens']}-token system prompt): {p['ttft_off_s'] * 1e3:.1f} -> "
             f"{p['ttft_on_s'] * 1e3:.1f} ms ({p['speedup']:.1f}x)")
    if r.get("chart"):
        echo(f"  chart: {r['chart']}")
