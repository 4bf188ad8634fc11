"""`quantize_model`: the one library call behind `infq quantize`.

Validates the request into a `QuantConfig`, opens the full-precision checkpoint (memory-mapped),
samples calibration windows when the method needs statistics, runs the shared calibration driver
block by block and streams every tensor straight into the writer of the method's format. Finished
blocks are staged in `.<out>.partial/` beside the target (see staging.py: `--resume` continues an
interrupted run from there); the checkpoint is assembled in that folder and renamed into place
only when complete. An existing output is replaced only with `force`, and only after the new one
is whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from infq.errors import InfqError
from infq.formats.safetensors_io import StoredTensor
from infq.quantizers.calibrate import (
    BlockResult,
    CalibrationContext,
    LayerStats,
    QuantizeFn,
    TransformFn,
    calibrate,
    map_large_allocations,
    release_memory,
)
from infq.quantizers.scheme import QuantConfig, QuantizedTensor, check_group_size
from infq.quantizers.staging import Stage, fingerprint

AVAILABLE = ("rtn", "gptq", "awq", "fp8", "kquant")
_COPY = re.compile(r"^(tokenizer.*|special_tokens_map\.json|generation_config\.json|.*\.tiktoken|vocab\.json|merges\.txt|added_tokens\.json|chat_template\.(json|jinja))$")


@dataclass(frozen=True)
class QuantizeRequest:
    model: str = "demo"
    method: str = "gptq"
    bits: int | None = None  # None: 4, or 8 for fp8
    group_size: int | None = None  # None: 128; fp8 scales are per tensor or per channel, never per group
    sym: bool | None = None  # None: the method's default (symmetric for rtn/gptq, asymmetric for awq)
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    dataset: str | None = None  # None: the demo corpus for the demo model, else c4
    data_file: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    skip: tuple[str, ...] = ()
    lm_head: bool = False
    out: str | None = None
    force: bool = False
    resume: bool = False
    device: str = "cpu"
    format: str = "auto"  # auto: the method's own (gptq for rtn/gptq, awq for awq)
    max_shard_bytes: int = 4 * 2**30
    weight_scale: str | None = None  # fp8: tensor | channel [default channel]
    act_scheme: str | None = None  # fp8: static | dynamic | none [default dynamic]
    act_percentile: float | None = None  # fp8 static: percentile of per-token maxima [default 100]
    type: str | None = None  # kquant: the llama.cpp mix (Q4_K_M, ...) [default Q4_K_M]
    tensor_types: tuple[str, ...] = ()  # kquant: REGEX=TYPE overrides on GGUF tensor names
    imatrix: str | None = None  # kquant: read this llama.cpp imatrix (.dat/.gguf) instead of calibrating
    imatrix_out: str | None = None  # kquant: save the importance matrix here (.gguf, else legacy .dat)
    no_imatrix: bool = False  # kquant: no importance matrix, no calibration data


FORMATS = ("auto", "gptq", "awq", "compressed-tensors", "fp8")
DEFAULT_FORMAT = {"rtn": "gptq", "gptq": "gptq", "awq": "awq", "fp8": "compressed-tensors"}


def _rtn(weight: Tensor, stats: LayerStats, config: QuantConfig) -> tuple[QuantizedTensor, dict[str, float]]:
    from infq.quantizers.rtn import quantize_rtn

    return quantize_rtn(weight, config), {}


def _kquant(weight: Tensor, stats: LayerStats, config: QuantConfig) -> tuple[QuantizedTensor, dict[str, float]]:
    from infq.quantizers.kquants import quantize_kquant

    return quantize_kquant(weight, stats, config), {}


def method_fn(method: str) -> QuantizeFn:
    if method in ("rtn", "awq"):  # AWQ's codes are RTN of the scaled, clipped weights
        return _rtn
    if method == "gptq":
        from infq.quantizers.gptq import quantize_gptq

        return quantize_gptq
    if method == "fp8":
        from infq.quantizers.fp8 import quantize_fp8

        return quantize_fp8
    if method == "kquant":
        return _kquant
    raise InfqError(
        f"--method {method} is not available in this version of infq; available: {', '.join(AVAILABLE)}"
    )


_HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}  # half models: blocks and activations stay half


def _transform(method: str) -> TransformFn | None:
    if method == "awq":
        from infq.quantizers.awq import awq_block

        return awq_block
    return None


def default_out(model_path: Path, config: QuantConfig) -> Path:
    name = model_path.name if model_path.name != "demo" else "infq-demo"
    if config.method == "fp8":
        return Path.cwd() / f"{name}-fp8-{config.weight_scale}-{config.act_scheme}"
    gs = "c" if config.group_size == -1 else str(config.group_size)
    return Path.cwd() / f"{name}-{config.method}-w{config.bits}g{gs}"


def rss_peak_bytes() -> int:
    from infq.eval.throughput import peak_rss_bytes

    return peak_rss_bytes()


def quantize_model(req: QuantizeRequest, bar: Any = None) -> dict[str, Any]:
    """Quantize `req.model` and write the checkpoint; returns the summary `infq quantize` prints."""
    from infq.formats.hf import Checkpoint, read_config, resolve_model, weight_paths
    from infq.runtime.arch import ModelConfig
    from infq.runtime.loader import HFWeights, check_checkpoint, expected_shapes

    if req.method == "kquant":  # one GGUF file through its own pipeline (mixes, imatrix files)
        from infq.quantizers.kquant_pipeline import quantize_kquant_model

        map_large_allocations()
        return quantize_kquant_model(req, bar)
    start = time.perf_counter()
    map_large_allocations()  # freed transients go back to the OS: RSS tracks one block
    config = request_config(req)
    fn = method_fn(config.method)
    src = resolve_model(req.model)
    hf_config = read_config(src)
    if hf_config.get("quantization_config"):
        raise InfqError(f"{src} is already quantized; quantize the full-precision model instead")
    cfg = ModelConfig.from_hf(hf_config)
    if config.lm_head and cfg.tie_word_embeddings:
        raise InfqError("lm_head is tied to the embeddings in this model; quantize without --lm-head")
    ckpt = Checkpoint(src, mmap=False)  # one block's weights in memory at a time
    check_checkpoint(ckpt, cfg)
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("_proj.weight"):
            check_group_size(shape[1], config.group_size)
    layout = _layout(req, config, cfg)  # format errors (AWQ at 3 bits, ...) before any calibration
    out = Path(req.out) if req.out else default_out(src, config)
    if out.exists() and not req.force:
        raise InfqError(f"{out} already exists; pass --force to replace it or choose another --out")
    windows = _windows(req, config, src, cfg) if needs_calibration(config) else None
    release_memory()  # the tokenizer and the corpus text are gone: hand their pages back
    stage_dir = out.parent / f".{out.name}.partial"
    if req.force and not req.resume and stage_dir.exists():
        shutil.rmtree(stage_dir)
    fp = fingerprint(hf_config, weight_paths(src), {**config.to_dict(), "seed": req.seed}, windows)
    stage = Stage(stage_dir, fp)
    done = stage.start(req.resume)
    ctx = CalibrationContext(cfg, HFWeights(ckpt), config, fn, device=torch.device(req.device),
                             store_dtype=_HALF.get(cfg.torch_dtype), transform=_transform(config.method),
                             stats=None if needs_calibration(config) else frozenset())
    ctx.on_linear = _linear_progress(bar, cfg.num_layers, len(done))
    ctx.spill_dir = stage_dir  # on the output's disk: activations wait there while big Hessians are solved
    for result in calibrate(ctx, windows, done):
        stage.save(result)
        del result  # staged on disk; the next block must not find its codes still resident
    tmp = stage_dir / "out"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    staged = (stage.read(i) for i in range(cfg.num_layers + int(config.lm_head)))
    stats = _write(tmp, src, hf_config, ckpt, cfg, config, staged, req, layout)
    _replace(tmp, out)
    shutil.rmtree(stage_dir)
    return {
        "out": str(out), "method": config.method, "bits": config.bits, "group_size": config.group_size,
        "sym": config.sym, "desc_act": config.desc_act, "format": layout.format,
        "checkpoint_format": layout.checkpoint_format if layout.format == "gptq" else None,
        **({"weight_scale": config.weight_scale, "act_scheme": config.act_scheme,
            "act_percentile": config.act_percentile} if config.method == "fp8" else {}),
        "seconds": round(time.perf_counter() - start, 3), "peak_rss_bytes": rss_peak_bytes(),
        "bits_per_weight": stats["bits_per_weight"], "quantized_linears": stats["linears"],
        "bytes_before": ckpt.file_bytes(), "bytes_after": sum(p.stat().st_size for p in weight_paths(out)),
        "dataset": None if windows is None else (req.dataset or _default_dataset(req)),
        "nsamples": 0 if windows is None else int(windows.shape[0]),
        "seqlen": 0 if windows is None else int(windows.shape[1]),
        "resumed_blocks": len(done),
        "warnings": stats["warnings"],
    }


def request_config(req: QuantizeRequest) -> QuantConfig:
    """The QuantConfig of a request, with each method's defaults; FP8 flags on other methods refused."""
    fp8 = req.method == "fp8"
    given = [f for f, v in (("--weight-scale", req.weight_scale), ("--act-scheme", req.act_scheme),
                            ("--act-percentile", req.act_percentile)) if v is not None]
    if given and not fp8:
        raise InfqError(f"{given[0]} applies to --method fp8 only; drop it or use --method fp8")
    kq = [f for f, v in (("--type", req.type is not None), ("--tensor-type", bool(req.tensor_types)),
                         ("--imatrix", req.imatrix is not None), ("--imatrix-out", req.imatrix_out is not None),
                         ("--no-imatrix", req.no_imatrix)) if v]
    if kq and req.method != "kquant":
        raise InfqError(f"{kq[0]} applies to --method kquant only; drop it or use --method kquant")
    if fp8 and req.group_size is not None:
        raise InfqError("fp8 has no groups: its scales are per tensor or per channel; use --weight-scale tensor|channel "
                        "instead of --group-size")
    if fp8 and req.sym is False:
        raise InfqError("fp8 weights are symmetric (no zero point); drop --asym")
    sym = req.sym if req.sym is not None else req.method != "awq"
    return QuantConfig(
        method=req.method, bits=req.bits if req.bits is not None else (8 if fp8 else 4),
        group_size=-1 if fp8 else (req.group_size if req.group_size is not None else 128), sym=sym,
        desc_act=req.desc_act, static_groups=req.static_groups, damp_percent=req.damp_percent,
        nsamples=req.nsamples, seqlen=req.seqlen, skip=req.skip, lm_head=req.lm_head,
        weight_scale=req.weight_scale or "channel", act_scheme=req.act_scheme or "dynamic",
        act_percentile=100.0 if req.act_percentile is None else req.act_percentile,
    )


def needs_calibration(config: QuantConfig) -> bool:
    """RTN and FP8 without static activation scales quantize each weight on its own: no data."""
    if config.method == "fp8":
        return config.act_scheme == "static"
    return config.method != "rtn"


def _linear_progress(bar: Any, blocks: int, done: int) -> Callable[[int, str, dict[str, float]], None] | None:
    """Progress per block; the line shows the last linear's loss, damp and time."""
    if bar is None:
        return None
    task = bar.add_task("quantize", total=blocks, completed=done, info="")
    last = {"block": done}

    def on_linear(i: int, name: str, info: dict[str, float]) -> None:
        if i != last["block"]:
            bar.update(task, completed=i)
            last["block"] = i
        short = name.rsplit(".", 1)[-1]
        parts = [f"block {i} {short}"]
        if "loss" in info:
            parts.append(f"loss {info['loss']:.4g}")
        if "damp" in info:
            parts.append(f"damp {info['damp']:g}")
        parts.append(f"{info['seconds']:.2f} s")
        bar.update(task, info=" ".join(parts))
        if name.endswith("down_proj"):
            bar.update(task, completed=i + 1)

    return on_linear


def _default_dataset(req: QuantizeRequest) -> str:
    return "demo" if req.model == "demo" else "c4"


def _windows(req: QuantizeRequest, config: QuantConfig, src: Path, cfg: Any) -> Tensor:
    from infq.eval.datasets import calibration_windows
    from infq.formats.hf import load_tokenizer

    seqlen = min(config.seqlen, cfg.max_position_embeddings)
    tok = load_tokenizer(src)
    return calibration_windows(tok, req.dataset or _default_dataset(req), config.nsamples, seqlen, req.seed, req.data_file)


def _layout(req: QuantizeRequest, config: QuantConfig, cfg: Any) -> Any:
    """The packed layout the checkpoint is written in, validated against the config now."""
    from infq.formats.gptq import default_checkpoint_format
    from infq.formats.packed import PackedLayout

    if req.format == "gguf":
        raise InfqError(f"--format gguf is written by --method kquant, not {config.method}; use --method kquant --type Q4_K_M")
    if req.format not in FORMATS:
        raise InfqError(f"--format {req.format} is unknown; use one of {', '.join(FORMATS)}")
    fmt = DEFAULT_FORMAT.get(config.method, "gptq") if req.format == "auto" else req.format
    layout = PackedLayout(fmt, config, default_checkpoint_format(config))
    layout.quantization_config(_unquantized(cfg, config))  # raises the format's one-line refusals
    return layout


def _unquantized(cfg: Any, config: QuantConfig) -> list[str]:
    """Full names of the block linears `--skip` leaves in full precision."""
    arch = cfg.arch
    names = [arch.linear_name(i, r) for i in range(cfg.num_layers) for r in arch.linears]
    return [n for n in names if config.is_skipped(n)]


def _write(tmp: Path, src: Path, hf_config: dict[str, Any], ckpt: Any, cfg: Any, config: QuantConfig,
           blocks: Iterator[BlockResult], req: QuantizeRequest, layout: Any) -> dict[str, Any]:
    from infq.formats.safetensors_io import write_shards

    totals: dict[str, Any] = {"bits": 0.0, "weights": 0, "linears": 0, "warnings": []}
    tensors = _stream(ckpt, cfg, config, blocks, layout, totals)
    write_shards(tmp, tensors, max_shard_bytes=req.max_shard_bytes)
    qc = layout.quantization_config(_unquantized(cfg, config))
    (tmp / "config.json").write_text(json.dumps({**hf_config, "quantization_config": qc}, indent=2))
    if layout.format == "gptq":  # GPTQ tools also read a standalone quantize_config.json
        (tmp / "quantize_config.json").write_text(json.dumps(qc, indent=2))
    for f in src.iterdir():
        if f.is_file() and _COPY.match(f.name):
            shutil.copy2(f, tmp / f.name)
    for f in tmp.iterdir():
        f.chmod(0o644)
    return {"bits_per_weight": totals["bits"] / max(totals["weights"], 1), "linears": totals["linears"],
            "warnings": totals["warnings"]}


def _stream(ckpt: Any, cfg: Any, config: QuantConfig, blocks: Iterator[BlockResult], layout: Any,
            totals: dict[str, Any]) -> Iterator[tuple[str, Tensor | StoredTensor]]:
    """(name, tensor) pairs for the writer: unquantized tensors as stored, quantized ones packed."""
    arch = cfg.arch
    prefixes = [arch.block(i) + "." for i in range(cfg.num_layers)] + ["lm_head."]
    head = arch.lm_head if config.lm_head else None
    for name in ckpt.keys():  # embeddings, final norm, lm_head unless quantized: copied in chunks
        if not any(name.startswith(p) for p in prefixes[:-1]) and name != head:
            yield name, ckpt.stored(name)
    for result in blocks:
        prefix = prefixes[result.index]
        for module, info in result.info.items():
            if info.get("damp_escalations"):
                totals["warnings"].append(
                    f"{module}: Cholesky failed at damp {config.damp_percent:g}; raised to {info['damp']:g}"
                )
        for module, qt in result.tensors.items():
            bias_name = f"{module}.bias"
            bias = result.dense.get(bias_name, ckpt.get(bias_name) if bias_name in ckpt else None)
            packed = layout.encode(qt, bias)
            for suffix in list(packed):
                yield f"{module}.{suffix}", packed.pop(suffix)
            totals["bits"] += 8 * qt.nbytes
            totals["weights"] += qt.shape[0] * qt.shape[1]
            totals["linears"] += 1
        done = {f"{m}.weight" for m in result.tensors} | {f"{m}.bias" for m in result.tensors}
        for name in ckpt.keys():
            if name.startswith(prefix) and name not in done and name != arch.lm_head:
                if name in result.dense:  # rewritten by the method (AWQ's scaled norms), stored as the source was
                    yield name, result.dense[name].to(ckpt.dtype(name))
                else:
                    yield name, ckpt.stored(name)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished output into place; an existing one is removed only after that."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
