"""`infq run`: generate through the paged-KV continuous-batching engine.

One `--prompt` streams its tokens to the terminal as they come and ends with TTFT, tokens/s and
memory; `--prompts-file` runs many prompts through the engine together and prints each result when
it finishes. `--json` prints one object per prompt instead. `--chat` (or `--system`, `--chat-template`,
or `messages` records in a .jsonl file) renders prompts with the model's chat template (`runtime.chat`);
`--interactive` holds a conversation in the terminal, one line a turn.
"""

from __future__ import annotations

import time

import typer

from infq.cli.common import cli_errors, human_bytes, print_json


def run(
    model: str = typer.Argument("demo", help="Model directory, .gguf file, hub id, or 'demo'."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Prompt text."),
    prompts_file: str = typer.Option(None, "--prompts-file", help="Many prompts: .txt (one per line) or .jsonl (field 'prompt', or 'messages': a conversation for the chat template)."),
    chat: bool = typer.Option(False, "--chat", help="Render each prompt as a user turn with the model's chat template (instruct models)."),
    system: str = typer.Option(None, "--system", help="A system message before each prompt (implies --chat)."),
    chat_template: str = typer.Option(None, "--chat-template", help="A Jinja chat template file (or JSON with 'chat_template') instead of the model's (implies --chat)."),
    interactive: bool = typer.Option(False, "--interactive", "-i", help="Chat in the terminal: each line typed is the next user turn of one conversation (a trailing \\ continues the line; /reset starts over; /exit or end of input quits)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    seed: int = typer.Option(None, "--seed", help="Seed for sampling (per request)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens less likely than this times the most likely one (0 = off)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="Divide the positive logits (multiply the negative ones) of tokens already in the prompt or output (1 = off; transformers' and vLLM's semantics)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past end-of-sequence."),
    logprobs: int = typer.Option(0, "--logprobs", help="With --json: each generated token's log-probability (raw model distribution) and the N most likely alternatives."),
    n: int = typer.Option(1, "--n", help="Samples per prompt (parallel sampling: the prompt is computed once and its KV blocks shared copy-on-write; seeded samples use seed + i)."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop when this string appears (repeatable)."),
    kv_memory: str = typer.Option("auto", "--kv-memory", help="KV cache budget, e.g. 256MiB (auto: max-num-seqs full contexts, <= 4 GiB)."),
    kv_dtype: str = typer.Option("auto", "--kv-dtype", help="KV cache storage: auto (model dtype), int8, fp8."),
    block_size: int = typer.Option(None, "--block-size", help="Tokens per KV block \\[default: 8 on a CPU, 16 on CUDA]."),
    max_num_seqs: int = typer.Option(64, "--max-num-seqs", help="Requests running at once at most."),
    max_batched_tokens: int = typer.Option(512, "--max-batched-tokens", help="Tokens per engine step (prefill chunk budget)."),
    no_prefix_cache: bool = typer.Option(False, "--no-prefix-cache", help="Turn automatic prefix caching off."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="Replay decode steps as CUDA graphs (captured per batch-size bucket on first use; cuts launch overhead on a GPU)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (CPU: fp32, or bf16 for integer-quantized weights; GPU: the checkpoint's half type), float32, bfloat16, float16."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    draft: str = typer.Option(None, "--draft", help="Speculative decoding: a draft checkpoint sharing the tokenizer, or 'ngram' (prompt lookup)."),
    num_draft: str = typer.Option("4", "--num-draft", help="Draft tokens per step, K >= 1, or 'auto' (adapted per request to its acceptance rate)."),
    draft_dtype: str = typer.Option(None, "--draft-dtype", help="The draft's dtype (default: --dtype); bfloat16 on a CPU runs 1-8-bit drafts on int4pack kernels."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per prompt instead of streaming."),
) -> None:
    """Generate text. Example: infq run qwen-awq --prompt "The capital of France is" """
    with cli_errors():
        from infq.errors import InfqError
        from infq.runtime.chat import ChatEncoder, compile_template, encode_text, read_template
        from infq.runtime.engine import EngineConfig, default_block_size
        from infq.runtime.generate import open_engine, read_prompts, run_prompts
        from infq.runtime.kv_cache import parse_memory
        from infq.runtime.sampling import SamplingParams

        if cuda_graphs and not device.startswith("cuda"):
            raise InfqError("--cuda-graphs needs --device cuda (CUDA graphs replay GPU work; drop the flag on a CPU)")
        if interactive:
            if prompt is not None or prompts_file is not None or draft is not None or n != 1:
                raise InfqError("--interactive reads its turns from the terminal; drop --prompt, --prompts-file, --draft "
                                "and --n")
            chat = True
        elif (prompt is None) == (prompts_file is None):
            raise InfqError("pass exactly one of --prompt TEXT or --prompts-file FILE (or --interactive)")
        prompts = [] if interactive else [prompt] if prompt is not None else read_prompts(prompts_file)
        params = SamplingParams(temperature, top_k, top_p, seed, min_p, repetition_penalty)
        config = EngineConfig(block_size=default_block_size(device) if block_size is None else block_size,
                              kv_memory=None if kv_memory == "auto" else parse_memory(kv_memory),
                              kv_dtype=kv_dtype, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched_tokens,
                              prefix_caching=not no_prefix_cache, cuda_graphs=cuda_graphs)
        if max_new_tokens < 1:
            raise InfqError(f"--max-new-tokens {max_new_tokens} must be at least 1")
        if logprobs and not json_out:
            raise InfqError("--logprobs needs --json (the log-probabilities are printed in the JSON objects)")
        chat = chat or system is not None or chat_template is not None or any(not isinstance(p, str) for p in prompts)
        template = read_template(chat_template) if chat_template is not None else None
        if template is not None:
            compile_template(template)  # a Jinja error is reported before the model loads
        engine, loaded = open_engine(model, config, dtype, device)
        encode = ChatEncoder(loaded.tokenizer, template, system, str(model)) if chat else None
        if interactive:
            _interactive(engine, encode, system, max_new_tokens, params, ignore_eos, stop, json_out)
            return
        if draft is not None:
            from infq.eval.spec_bench import warm_up
            from infq.runtime.speculative import build_speculator

            engine.speculator = build_speculator(engine, loaded, draft, num_draft, draft_dtype or dtype, device)
            warm_up(engine, (encode or (lambda p: encode_text(engine.tokenizer, p)))(prompts[0]))  # warm runs compared
        stream = prompt is not None and not json_out and n == 1
        on_output = (lambda _i, out: typer.echo(out.new_text, nl=False)) if stream else None
        start = time.perf_counter()
        results = run_prompts(engine, prompts, max_new_tokens, params, ignore_eos=ignore_eos, stop=stop or (),
                              on_output=on_output, encode=encode, n=n, logprobs=logprobs)
        spec = _speculative(engine, prompts, results, time.perf_counter() - start, max_new_tokens, params,
                            ignore_eos, stop, encode) if draft is not None else {}
        memory = _memory(engine)
        if prompt is not None and "error" in results[0]:
            raise InfqError(results[0]["error"])
        for i, res in enumerate(results):
            if json_out:
                print_json({**res, **memory, **spec})
            elif "error" in res:
                typer.echo(f"[prompt {res.get('index', i)}] rejected: {res['error']}", err=True)
            else:
                if not stream:
                    label = f"prompt {res['index']}, sample {res['sample']}" if n > 1 else f"prompt {i}"
                    typer.echo(f"--- {label}: {res['prompt']!r}\n{res['text']}")
                else:
                    typer.echo("")
                typer.echo(
                    f"[{len(res['token_ids'])} tokens; TTFT {res['ttft_s'] * 1000:.1f} ms; {res['tokens_per_s']:.1f} tokens/s; "
                    f"peak RSS {human_bytes(memory['peak_rss_bytes'])}; KV cache {human_bytes(memory['kv_cache_bytes'])}"
                    + (f"; GPU peak {human_bytes(memory['gpu_peak_bytes'])}" if memory.get("gpu_peak_bytes") else "") + "]",
                    err=True,
                )
        if spec and not json_out:
            typer.echo(
                f"[speculative ({spec['draft']}, K={spec['num_draft']}): acceptance {spec['acceptance_rate']:.2f}, "
                f"{spec['tokens_per_target_step']:.2f} tokens per target step; {spec['speedup']:.2f}x plain decoding "
                f"({spec['speculative_seconds']:.2f} s vs {spec['plain_seconds']:.2f} s)]", err=True)
        failed = sum("error" in r for r in results)
        if failed:
            raise InfqError(f"{failed} of {len(results)} prompts were rejected (see their error {'fields' if json_out else 'lines'})")


def _interactive(engine, encode, system, max_new_tokens, params, ignore_eos, stop, json_out) -> None:
    """The conversation loop of --interactive: read a turn, stream the reply, keep both. The engine
    (and its prefix cache) lives across turns, so each turn recomputes only what the last one did
    not already hold. Ctrl-C during a reply aborts it (the turn is dropped); at the prompt, it quits."""
    import sys

    from infq.runtime.generate import run_prompts

    start = [{"role": "system", "content": system}] if system is not None else []
    messages = list(start)
    while True:
        typer.echo("> ", nl=False, err=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:
            typer.echo("", err=True)
            return
        text = line.rstrip("\n")
        while text.endswith("\\"):  # a trailing backslash continues the turn on the next line
            more = sys.stdin.readline()
            if not more:
                break
            text = text[:-1] + "\n" + more.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/exit":
            return
        if text.strip() == "/reset":
            messages = list(start)
            typer.echo("[conversation cleared]", err=True)
            continue
        turn = [*messages, {"role": "user", "content": text}]
        on_output = None if json_out else (lambda _i, out: typer.echo(out.new_text, nl=False))
        try:
            res = run_prompts(engine, [turn], max_new_tokens, params, ignore_eos=ignore_eos, stop=stop or (),
                              on_output=on_output, encode=encode)[0]
        except KeyboardInterrupt:  # Ctrl-C stops the reply (the turn is dropped); at the prompt it quits
            engine.abort(0)
            typer.echo("\n[reply interrupted; the turn is dropped]", err=True)
            continue
        if "error" in res:
            typer.echo(f"[turn rejected: {res['error']}; /reset starts a new conversation]", err=True)
            continue
        messages = [*turn, {"role": "assistant", "content": res["text"]}]
        memory = _memory(engine)
        if json_out:
            print_json({**res, "prompt": text, **memory})
        else:
            typer.echo("")
            typer.echo(f"[{len(res['token_ids'])} tokens; {res['prompt_tokens']} prompt tokens, {res['cached_tokens']} "
                       f"from the prefix cache; TTFT {res['ttft_s'] * 1000:.1f} ms; {res['tokens_per_s']:.1f} tokens/s]",
                       err=True)


def _speculative(engine, prompts, results, seconds, max_new_tokens, params, ignore_eos, stop, encode) -> dict:
    """Acceptance, tokens per target step, and the speedup over the same prompts decoded plainly."""
    from infq.eval.spec_bench import compare_with_plain

    return compare_with_plain(engine, prompts, results, seconds, max_new_tokens, params, ignore_eos=ignore_eos,
                              stop=stop or (), encode=encode)


def _memory(engine) -> dict:
    import torch

    from infq.eval.throughput import peak_rss_bytes

    mem = {"peak_rss_bytes": peak_rss_bytes(), "kv_cache_bytes": engine.kv.nbytes}
    if engine.model.device.type == "cuda":
        mem["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(engine.model.device)
    return mem
