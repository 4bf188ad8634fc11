"""`infq eval`: perplexity of any checkpoint infq loads, under the GPTQ or llama.cpp protocol."""

from __future__ import annotations

import typer

from infq.cli.common import cli_errors, print_json, progress


def eval_(
    model: str = typer.Argument("demo", help="Model directory, .gguf file, hub id, or 'demo' (bundled)."),
    ppl: str = typer.Option("wikitext2", "--ppl", help="Dataset: wikitext2 (alias wikitext), c4, ptb, demo, or a local .txt/.jsonl/.parquet path."),
    data_file: str = typer.Option(None, "--data-file", help="Local copy of the named dataset's split (e.g. wiki.test.raw)."),
    seqlen: int = typer.Option(None, "--seqlen", help="Window length (default: 2048 or the model's max for gptq, 512 for llamacpp)."),
    protocol: str = typer.Option("gptq", "--protocol", help="gptq (non-overlapping windows, papers' tables) or llamacpp (llama-perplexity: score 2nd half)."),
    limit: int = typer.Option(None, "--limit", help="Evaluate at most N windows."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (fp32 on CPU), float32, bfloat16, float16."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Perplexity on a dataset. Example: infq eval MODEL --ppl wikitext2 --data-file wiki.test.raw --seqlen 512 --json"""
    with cli_errors():
        from infq.eval.perplexity import EvalRequest, evaluate_ppl

        req = EvalRequest(model, ppl, data_file, seqlen, protocol, limit, dtype, device)
        with progress(quiet=json_out) as bar:
            task = bar.add_task("perplexity", total=None, info="")

            def on_window(i: int, n: int, running: float) -> None:
                bar.update(task, completed=i, total=n, info=f"ppl {running:.3f}")

            result = evaluate_ppl(req, on_window)
        if json_out:
            print_json(result)
            return
        pm = f" ± {result['stderr']:.4f}" if result["protocol"] == "llamacpp" else ""
        typer.echo(
            f"{result['dataset']} ({result['protocol']} protocol, seqlen {result['seqlen']}): "
            f"{result['windows']} windows, {result['tokens']:,} tokens of {result['dataset_tokens']:,}, "
            f"ppl {result['ppl']:.4f}{pm}  [{result['seconds']:.1f} s]"
        )
