"""`infq inspect`: architecture, parameters, format, per-tensor scheme, bytes and bits per weight, and
the tokenizer files, chat template and end-of-generation ids a run would use."""

from __future__ import annotations

import typer

from infq.cli.common import cli_errors, human_bytes, print_json


def inspect(
    path: str = typer.Argument("demo", help="Model directory, .gguf file, hub id, or 'demo'."),
    tensors: bool = typer.Option(True, "--tensors/--summary", help="List every tensor (default) or only the summary."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show what a checkpoint holds. Example: infq inspect qwen-awq"""
    with cli_errors():
        from infq.formats.inspect import inspect_checkpoint

        info = inspect_checkpoint(path)
        if json_out:
            print_json(info)
            return
        from rich.console import Console
        from rich.table import Table

        console = Console()
        if tensors:
            table = Table("tensor", "shape", "scheme", "bytes", box=None, pad_edge=False)
            for t in info["tensors"]:
                table.add_row(t["name"], "x".join(map(str, t["shape"])), t["scheme"], f"{t['bytes']:,}")
            console.print(table)
        console.print(
            f"[bold]{info['path']}[/]\n"
            f"  format        {info['format']}\n"
            + (f"  quantization  {info['quantization']}\n" if info.get("quantization") else "")
            + f"  architecture  {info['architecture']} ({info['model_type']}, {info['layers']} layers, "
            f"hidden {info['hidden_size']}, vocab {info['vocab_size']})\n"
            f"  parameters    {info['parameters']:,}\n"
            f"  dtype         {info['dtype']}\n"
            f"  on disk       {human_bytes(info['bytes_on_disk'])} ({info['bytes_on_disk']:,} bytes)\n"
            f"  bits/weight   {info['bits_per_weight']:.3f}\n"
            f"  tokenizer     {_tokenizer_line(info['tokenizer'])}",
            highlight=False,
        )


def _tokenizer_line(tok: dict) -> str:
    files = ", ".join(tok["files"]) or "none (run and eval need one)"
    template = f"chat template in {tok['chat_template']}" if tok["chat_template"] else "no chat template"
    eos = ", ".join(map(str, tok["eos_token_ids"])) or "none"
    return f"{files}; {template}; end-of-generation ids {eos}"
