"""`infq run`: generate from a prompt, streaming tokens as they come, then TTFT and tokens/s."""

from __future__ import annotations

import typer

from infq.cli.common import cli_errors, print_json


def run(
    model: str = typer.Argument("demo", help="Model directory, .gguf file, hub id, or 'demo'."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    seed: int = typer.Option(None, "--seed", help="Seed for sampling."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past end-of-sequence."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (fp32 on CPU), float32, bfloat16, float16."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
) -> None:
    """Generate text. Example: infq run qwen-awq --prompt "The capital of France is" """
    with cli_errors():
        from infq.runtime.generate import GenerationStats, generate_text
        from infq.runtime.sampling import SamplingParams

        params = SamplingParams(temperature, top_k, top_p, seed)
        stats = GenerationStats()
        pieces = generate_text(model, prompt, max_new_tokens, params, ignore_eos, dtype, device, stats)
        text = ""
        for piece in pieces:
            text += piece
            if not json_out:
                typer.echo(piece, nl=False)
        if json_out:
            print_json({
                "prompt": prompt, "text": text, "token_ids": stats.token_ids,
                "prompt_tokens": stats.prompt_tokens, "ttft_s": stats.ttft_s,
                "tokens_per_s": stats.tokens_per_s, "peak_rss_bytes": stats_rss(),
            })
            return
        typer.echo("")
        typer.echo(
            f"[{stats.new_tokens} tokens; TTFT {stats.ttft_s * 1000:.1f} ms; "
            f"{stats.tokens_per_s:.1f} tokens/s; peak RSS {stats_rss() / 2**20:.0f} MiB]",
            err=True,
        )


def stats_rss() -> int:
    from infq.eval.throughput import peak_rss_bytes

    return peak_rss_bytes()
