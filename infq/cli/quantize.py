"""`infq quantize`: calibrate a model and write a packed checkpoint (GPTQ/AWQ/FP8/GGUF layouts)."""

from __future__ import annotations

import typer

from infq.cli.common import cli_errors, human_bytes, print_json, progress

METHODS = "rtn, gptq, awq, fp8, kquant"


def quantize(
    model: str = typer.Option("demo", "--model", "-m", help="Model directory, hub id, or 'demo' (bundled)."),
    method: str = typer.Option("gptq", "--method", help=f"One of: {METHODS}."),
    bits: int = typer.Option(None, "--bits", help="Weight bits: 2, 3, 4 or 8 (the AWQ GEMM format takes 4; write other widths with --format gptq) \\[default: 4; 8 for fp8]."),
    group_size: int = typer.Option(None, "--group-size", help="Input channels per scale; -1 = one per output channel \\[default: 128; fp8 uses --weight-scale]."),
    sym: bool = typer.Option(None, "--sym/--asym", help="Symmetric (zero at 2^(b-1)) or asymmetric codes \\[default: sym for rtn/gptq, asym for awq]."),
    desc_act: bool = typer.Option(False, "--desc-act", help="GPTQ act-order: quantize columns by decreasing Hessian diagonal."),
    static_groups: bool = typer.Option(False, "--static-groups", help="With --desc-act: fix group scales before reordering."),
    damp_percent: float = typer.Option(0.01, "--damp", help="GPTQ dampening, fraction of the mean Hessian diagonal."),
    dataset: str = typer.Option(None, "--dataset", help="Calibration data: c4, wikitext2, ptb, demo, or a local .txt/.jsonl/.parquet path \\[default: demo for the demo model, else c4]."),
    data_file: str = typer.Option(None, "--data-file", help="Local copy of the named dataset's calibration split."),
    nsamples: int = typer.Option(128, "--nsamples", help="Calibration windows."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Tokens per calibration window (capped at the model's max)."),
    seed: int = typer.Option(0, "--seed", help="Seed for calibration sampling."),
    skip: list[str] = typer.Option([], "--skip", help="Regex of module names to leave unquantized (repeatable)."),
    lm_head: bool = typer.Option(False, "--lm-head", help="Quantize lm_head too (kept in full precision by default)."),
    out: str = typer.Option(None, "--out", "-o", help="Output directory (default: <model>-<method>-w<bits>g<group>)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last finished block."),
    device: str = typer.Option("cpu", "--device", help="Compute device: cpu or cuda."),
    fmt: str = typer.Option("auto", "--format", help="Checkpoint format: auto (gptq for rtn/gptq, awq for awq, compressed-tensors for fp8), gptq, awq, compressed-tensors, fp8 (vLLM's fp8 layout)."),
    weight_scale: str = typer.Option(None, "--weight-scale", help="fp8: one e4m3 weight scale per 'tensor' or per output 'channel' \\[default: channel]."),
    act_scheme: str = typer.Option(None, "--act-scheme", help="fp8 activations: 'static' (per-tensor input scales calibrated on --dataset), 'dynamic' (per token at run time, no data), 'none' (weight-only) \\[default: dynamic]."),
    act_percentile: float = typer.Option(None, "--act-percentile", help="fp8 static: input amax = this percentile of the per-token max |x| (e.g. 99.99) \\[default: 100, the max]."),
    qtype: str = typer.Option(None, "--type", help="kquant: llama.cpp mix Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, Q8_0 or Q4_0 \\[default: Q4_K_M]."),
    tensor_type: list[str] = typer.Option([], "--tensor-type", help="kquant: REGEX=TYPE on GGUF tensor names (e.g. 'attn_v=Q8_0'); repeatable, last match wins."),
    imatrix: str = typer.Option(None, "--imatrix", help="kquant: reuse this importance matrix (llama.cpp .dat or .gguf); no calibration."),
    imatrix_out: str = typer.Option(None, "--imatrix-out", help="kquant: save the importance matrix (.gguf, else llama.cpp's legacy .dat)."),
    no_imatrix: bool = typer.Option(False, "--no-imatrix", help="kquant: quantize without an importance matrix (no calibration data)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Quantize a model. Example: infq quantize --model Qwen/Qwen2.5-0.5B --method gptq --bits 4 --out qwen-gptq"""
    with cli_errors():
        _return_freed_memory()
        from infq.quantizers.api import QuantizeRequest, quantize_model

        req = QuantizeRequest(
            model=model, method=method, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act,
            static_groups=static_groups, damp_percent=damp_percent, dataset=dataset, data_file=data_file,
            nsamples=nsamples, seqlen=seqlen, seed=seed, skip=tuple(skip), lm_head=lm_head, out=out, force=force,
            resume=resume, device=device, format=fmt, weight_scale=weight_scale, act_scheme=act_scheme,
            act_percentile=act_percentile, type=qtype, tensor_types=tuple(tensor_type), imatrix=imatrix,
            imatrix_out=imatrix_out, no_imatrix=no_imatrix,
        )
        with progress(quiet=json_out) as bar:
            result = quantize_model(req, bar)
        if json_out:
            print_json(result)
            return
        for warning in result["warnings"]:
            typer.echo(f"warning: {warning}", err=True)
        if result["method"] == "kquant":
            _print_kquant(result)
            return
        typer.echo(
            f"wrote {result['out']} ({result['format']}): {human_bytes(result['bytes_before'])} -> "
            f"{human_bytes(result['bytes_after'])}, {result['bits_per_weight']:.3f} bits/weight, "
            f"{result['seconds']:.1f} s, peak RSS {human_bytes(result['peak_rss_bytes'])}"
        )


def _print_kquant(result: dict) -> None:
    types = ", ".join(f"{t} x{n}" for t, n in result["types"].items())
    im = result["imatrix"]
    source = "none" if im["source"] is None else f"{im['source']} ({im['entries']} tensors, {im['chunks']} chunks)"
    typer.echo(
        f"wrote {result['out']} (GGUF {result['type']}, file_type {result['file_type']}): "
        f"{human_bytes(result['bytes_before'])} -> {human_bytes(result['bytes_after'])}, "
        f"{result['bits_per_weight']:.3f} bits/weight, {result['seconds']:.1f} s (encode {result['encode_seconds']:.1f} s)"
    )
    typer.echo(f"types: {types}; imatrix: {source}" + (f", saved to {im['saved_to']}" if im.get("saved_to") else ""))
    if result["fallbacks"]:  # each also printed above as a warning, with the reason
        typer.echo(f"fallbacks: {len(result['fallbacks'])} tensors (rows not a multiple of their type's block)")
    for o in result["overrides"]:
        typer.echo(f"override: {o['tensor']} {o['from']} -> {o['to']}")


def _return_freed_memory() -> None:
    """glibc: serve buffers of 32 MiB and more with mmap, so freeing a block's tensors returns the
    memory to the OS instead of leaving it in the heap (the dynamic threshold otherwise climbs and
    the process's resident size only grows, block after block)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass
