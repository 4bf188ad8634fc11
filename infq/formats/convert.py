"""`convert_checkpoint`: lossless repacking between GPTQ, AWQ GEMM and compressed-tensors pack-quantized,
and between the two FP8 layouts (compressed-tensors float-quantized, vLLM fp8; per-tensor scales only
fit the latter). `--to gguf` (quantize into a GGUF file) and `--to hf` (a GGUF file decoded to an fp16
HF folder) are handed to `formats.gguf_convert`.

Every packed linear is decoded into a QuantizedTensor (the integer codes, scales and zero points
it stores) and encoded in the target layout; nothing is requantized. A conversion the target
cannot hold is refused with its reason: from the config before anything is written (bits, act-order
into AWQ, asymmetric into GPTQ v1, a format into itself), per tensor otherwise (a v1 zero point of
2^b, scales float16 cannot hold, zero points a symmetric target does not store). Everything else
(embeddings, norms, biases, an unpacked lm_head, tokenizer and generation files) is carried over
byte for byte, and config.json gets the target's quantization_config (GPTQ also quantize_config.json).
The output is assembled in `.<out>.partial/` beside the target, verified (every converted linear
dequantizes to bit-identical fp32 weights, every carried tensor is byte-equal) and only then
renamed into place; an existing output is replaced only with `force`, after the new one is whole.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from infq.errors import InfqError
from infq.formats import awq, compressed_tensors, gptq
from infq.formats.detect import detect_format
from infq.formats.hf import Checkpoint, read_config, resolve_model
from infq.formats.packed import PACKED_FORMATS, PackedLayout, layout_from_config
from infq.formats.safetensors_io import write_shards
from infq.quantizers.scheme import QuantizedTensor

TARGETS = PACKED_FORMATS
# Weights, their indexes and the configs infq rewrites; every other top-level file is carried over.
_NOT_CARRIED = re.compile(r"^(config\.json|quantize_config\.json|quant_config\.json|recipe\.yaml"
                          r"|.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?)$")


@dataclass(frozen=True)
class ConvertRequest:
    src: str
    to: str
    out: str
    force: bool = False
    gptq_format: str | None = None  # with to="gptq": "gptq" (v1) or "gptq_v2"; None: v1 if sym else v2
    max_shard_bytes: int = 4 * 2**30
    type: str | None = None  # with to="gguf": F16, F32, a mix (Q4_K_M) or a GGML type (formats.gguf_convert)


def convert_checkpoint(req: ConvertRequest) -> dict[str, Any]:
    """Repack `req.src` into `req.to` at `req.out`, verify it, and return the summary `infq convert` prints."""
    start = time.perf_counter()
    if req.to in ("gguf", "hf"):
        from infq.formats import gguf_convert

        if req.gptq_format is not None:
            raise InfqError(f"--gptq-format applies to --to gptq, not --to {req.to}; drop it")
        if req.to == "hf":
            if req.type is not None:
                raise InfqError("--type applies to --to gguf; --to hf writes float16")
            return gguf_convert.convert_gguf_to_hf(req.src, req.out, req.force)
        return gguf_convert.convert_to_gguf(req.src, req.out, req.type, req.force)
    if req.type is not None:
        raise InfqError(f"--type applies to --to gguf; --to {req.to} repacks without requantizing")
    if req.to not in TARGETS:
        raise InfqError(f"--to {req.to} is not a format infq converts to; use {', '.join(TARGETS)}, gguf or hf")
    src = resolve_model(req.src)
    fmt = detect_format(src)
    if fmt == "hf":
        raise InfqError(f"{src} is not quantized; quantize it with infq quantize (convert only repacks)")
    if fmt not in PACKED_FORMATS:
        raise InfqError(f"converting {fmt} checkpoints is not available; infq converts between {', '.join(TARGETS)}")
    out = Path(req.out)
    if src.resolve().is_relative_to(out.resolve()):
        raise InfqError(f"--out {out} holds the source checkpoint; choose another output directory")
    if out.exists() and not req.force:
        raise InfqError(f"{out} already exists; pass --force to replace it or choose another --out")
    hf_config = read_config(src)
    source = layout_from_config(fmt, hf_config["quantization_config"])
    ckpt = Checkpoint(src)
    modules = source.modules(ckpt.keys())
    if not modules:
        raise InfqError(f"{src} holds no {source.marker} tensors although its config says {fmt}; the checkpoint is incomplete")
    target = target_layout(source, req.to, req.gptq_format, lm_head=any(_is_lm_head(m) for m in modules))
    qc = target.quantization_config(_unquantized(ckpt, source))  # refuses what the target cannot say
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write_shards(tmp, _stream(ckpt, source, target, set(modules)), max_shard_bytes=req.max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps({**hf_config, "quantization_config": qc}, indent=2) + "\n")
        if target.format == "gptq":
            (tmp / "quantize_config.json").write_text(json.dumps(qc, indent=2) + "\n")
        for f in sorted(src.iterdir()):
            if f.is_file() and not f.name.startswith(".") and not _NOT_CARRIED.match(f.name):
                shutil.copy2(f, tmp / f.name)
        verify_conversion(ckpt, source, tmp, target.format, modules)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace(tmp, out)
    return {
        "src": str(src), "out": str(out), "from": source.format, "to": target.format,
        "checkpoint_format": target.checkpoint_format if target.format == "gptq" else None,
        "linears": len(modules), "verified": True, "seconds": round(time.perf_counter() - start, 3),
        "warnings": _warnings(target),
    }


def _warnings(target: PackedLayout) -> list[str]:
    if target.format == "compressed-tensors" and compressed_tensors.ct_actorder(target.config) == "group":
        return ["act-order groups are stored as actorder 'group' (weight_g_idx), which compressed-tensors "
                "0.20 and later no longer load; convert act-order checkpoints to gptq for the widest support"]
    return []


def target_layout(source: PackedLayout, to: str, gptq_format: str | None, lm_head: bool) -> PackedLayout:
    """The target's layout for the source's config; refuses, with the reason, what would lose information."""
    config = replace(source.config, lm_head=lm_head)
    if gptq_format is not None and (to != "gptq" or gptq_format not in gptq.FORMATS):
        raise InfqError(f"--gptq-format {gptq_format} needs --to gptq and one of {', '.join(gptq.FORMATS)}")
    if to == "awq" and config.bits != awq.AWQ_BITS:
        raise InfqError(f"{config.bits}-bit weights cannot be written as AWQ: the AWQ GEMM format is 4-bit only; "
                        "convert to compressed-tensors or gptq instead")
    if to == "compressed-tensors" and config.bits not in compressed_tensors.CT_BITS:
        raise InfqError(f"{config.bits}-bit weights cannot be written as compressed-tensors pack-quantized, which "
                        "vLLM reads at 4 and 8 bits only; keep them in gptq")
    fmt = "gptq"
    if to == "gptq":
        fmt = gptq_format or gptq.default_checkpoint_format(config)
        if fmt == "gptq" and not config.sym:
            raise InfqError("asymmetric zero points (0 included) cannot be stored in GPTQ v1 ('gptq' stores zero-1); "
                            "use --gptq-format gptq_v2")
    if to == source.format and (to != "gptq" or fmt == source.checkpoint_format):
        same = f"{to} ({fmt})" if to == "gptq" else to
        raise InfqError(f"the checkpoint is already {same}; nothing to convert")
    return PackedLayout(to, config, fmt)


def _is_lm_head(module: str) -> bool:
    return module.split(".")[-1] == "lm_head"


def _unquantized(ckpt: Checkpoint, source: PackedLayout) -> list[str]:
    """Linears the source config declares skipped and stores as plain 2-D weights (AWQ names them)."""
    names = [n.removesuffix(".weight") for n in ckpt.keys() if n.endswith(".weight") and len(ckpt.shape(n)) == 2]
    return [m for m in names if not _is_lm_head(m) and source.config.is_skipped(m)]


def _check_lossless(qt: QuantizedTensor, target: PackedLayout, module: str) -> None:
    """Refuse what encoding would silently round: fp16 scales, zero points of a symmetric target.
    FP8 layouts keep the scales' dtype (compressed-tensors) or widen them to float32 (vLLM fp8)."""
    if qt.scheme.kind == "fp8":
        return
    if target.format in ("gptq", "awq") and qt.scales.dtype != torch.float16:
        back = qt.scales.to(torch.float16).to(qt.scales.dtype)
        if not torch.equal(back, qt.scales):
            raise InfqError(f"{module}: its {qt.scales.dtype} scales are not float16 values, and {target.format} stores "
                            "float16 scales; this conversion would lose information (convert to compressed-tensors)")
    half = 1 << (qt.scheme.bits - 1)
    symmetric = qt.zeros is not None and bool((qt.zeros == half).all())
    if target.format != "compressed-tensors" and target.config.sym and not symmetric:
        raise InfqError(f"{module}: zero points differ from {half} although the config says sym; "
                        "convert with --gptq-format gptq_v2 from an asymmetric config instead")


def _stream(ckpt: Checkpoint, source: PackedLayout, target: PackedLayout, modules: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of the output: packed linears re-encoded, everything else as stored."""
    for name in ckpt.keys():
        module, _, suffix = name.rpartition(".")
        if module in modules and suffix in source.parts:
            if suffix == source.marker:
                qt = source.read(ckpt, module)
                _check_lossless(qt, target, module)
                for part, tensor in target.encode(qt).items():
                    yield f"{module}.{part}", tensor
            continue
        yield name, ckpt.get(name)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def verify_conversion(ckpt: Checkpoint, source: PackedLayout, out_dir: Path, to: str, modules: list[str]) -> None:
    """Re-open the written checkpoint with the target's reader: every packed linear must dequantize to
    exactly the source's fp32 weights and every other tensor must be byte-equal; InfqError otherwise."""
    target = layout_from_config(to, read_config(out_dir)["quantization_config"])
    dst = Checkpoint(out_dir)
    packed = set(modules)
    carried = [n for n in ckpt.keys() if not (n.rpartition(".")[0] in packed and n.rpartition(".")[2] in source.parts)]
    written = set(target.modules(dst.keys()))
    if written != packed:
        raise InfqError(f"verification failed: the output packs {len(written)} linears, the source {len(packed)}; "
                        "nothing was written")
    for module in modules:
        qa, qb = source.read(ckpt, module), target.read(dst, module)
        if not torch.equal(qa.dequantize(torch.float32), qb.dequantize(torch.float32)):
            raise InfqError(f"verification failed: {module} does not dequantize to the source's weights; nothing was written")
        if qa.input_scale is not None and (qb.input_scale is None or not torch.equal(qa.input_scale, qb.input_scale)):
            raise InfqError(f"verification failed: {module}'s input_scale changed; nothing was written")
    for name in carried:
        if name not in dst or not _same_bytes(ckpt.get(name), dst.get(name)):
            raise InfqError(f"verification failed: tensor {name} was not carried over unchanged; nothing was written")


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished output into place; an existing one is removed only after that."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{time.time_ns()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
