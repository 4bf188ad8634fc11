"""`infq convert`: repack a quantized checkpoint into another format, losslessly, and prove it."""

from __future__ import annotations

import typer

from infq.cli.common import cli_errors, print_json


def convert(
    src: str = typer.Argument(..., help="Model directory (quantized, or full precision for --to gguf), .gguf file (for --to hf), or hub id."),
    to: str = typer.Option(..., "--to", help="Target format: gptq, awq or compressed-tensors (integer weights); compressed-tensors or fp8 (FP8 weights); gguf (with --type); hf (from a .gguf file)."),
    out: str = typer.Option(..., "--out", "-o", help="Output directory (a .gguf file for --to gguf)."),
    type_: str = typer.Option(None, "--type", help="With --to gguf: F16, F32, a llama.cpp mix (Q4_K_M, Q5_K_M, Q8_0, ...) or one GGML type for every weight (Q4_K, Q5_0, ...)."),
    gptq_format: str = typer.Option(None, "--gptq-format", help="With --to gptq: gptq (v1) or gptq_v2 (default: gptq when symmetric, else gptq_v2)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Repack without requantizing (every linear verified bit-identical), or convert to/from GGUF. Examples: infq convert qwen-awq --to gptq --out qwen-gptq; infq convert demo --to gguf --type Q4_K_M --out demo.gguf; infq convert demo.gguf --to hf --out demo-hf"""
    with cli_errors():
        from infq.formats.convert import ConvertRequest, convert_checkpoint

        result = convert_checkpoint(ConvertRequest(src, to, out, force, gptq_format, type=type_))
        if json_out:
            print_json(result)
            return
        for warning in result["warnings"]:
            typer.echo(f"warning: {warning}", err=True)
        if to in ("gguf", "hf"):
            what = f"{result['type']} " if to == "gguf" else "float16 "
            typer.echo(f"wrote {result['out']} ({what}{to}) from {result['src']} ({result['from']}): "
                       f"{result['tensors']} tensors, {result['bytes_after']:,} bytes [{result['seconds']:.1f} s]")
            return
        fmt = f" ({result['checkpoint_format']})" if result["checkpoint_format"] else ""
        typer.echo(
            f"wrote {result['out']} ({result['to']}{fmt}) from {result['src']} ({result['from']}): "
            f"{result['linears']} linears repacked, each verified to dequantize bit-identically "
            f"[{result['seconds']:.1f} s]"
        )
