"""`infq convert`: repack a quantized checkpoint into another format, losslessly, and prove it."""

from __future__ import annotations

import typer

from infq.cli.common import cli_errors, print_json


def convert(
    src: str = typer.Argument(..., help="Quantized model directory (GPTQ, AWQ or compressed-tensors) or hub id."),
    to: str = typer.Option(..., "--to", help="Target format: gptq, awq or compressed-tensors (integer weights); compressed-tensors or fp8 (FP8 weights)."),
    out: str = typer.Option(..., "--out", "-o", help="Output directory."),
    gptq_format: str = typer.Option(None, "--gptq-format", help="With --to gptq: gptq (v1) or gptq_v2 (default: gptq when symmetric, else gptq_v2)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Repack without requantizing; every linear is verified bit-identical. Example: infq convert qwen-awq --to gptq --out qwen-gptq"""
    with cli_errors():
        from infq.formats.convert import ConvertRequest, convert_checkpoint

        result = convert_checkpoint(ConvertRequest(src, to, out, force, gptq_format))
        if json_out:
            print_json(result)
            return
        for warning in result["warnings"]:
            typer.echo(f"warning: {warning}", err=True)
        fmt = f" ({result['checkpoint_format']})" if result["checkpoint_format"] else ""
        typer.echo(
            f"wrote {result['out']} ({result['to']}{fmt}) from {result['src']} ({result['from']}): "
            f"{result['linears']} linears repacked, each verified to dequantize bit-identically "
            f"[{result['seconds']:.1f} s]"
        )
