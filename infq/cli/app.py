"""The `infq` command: a Typer app whose subcommands live one per module.

Subcommand modules import only typer/rich at module level; torch and the library are imported
inside the command bodies, so `infq --help` and `infq SUBCOMMAND --help` start in a fraction of a
second and never import torch.
"""

from __future__ import annotations

import typer

from infq import __version__
from infq.cli import bench, convert, eval, inspect, quantize, run

app = typer.Typer(
    name="infq",
    help="Quantize Hugging Face causal LMs (GPTQ, AWQ, FP8, GGUF K-quants) and run what you wrote.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("quantize")(quantize.quantize)
app.command("eval")(eval.eval_)
app.command("run")(run.run)
app.command("bench")(bench.bench)
app.command("inspect")(inspect.inspect)
app.command("convert")(convert.convert)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"infq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """infq: smaller, faster LLMs in the formats the ecosystem already loads."""


def main() -> None:
    app()
