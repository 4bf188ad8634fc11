"""`infq convert` to and from GGUF: an HF or packed checkpoint -> a llama GGUF file, a GGUF -> an fp16 HF folder.

To GGUF (`--to gguf --type T`): T is `F32`/`F16` (2-D weights in that type, 1-D tensors F32), a
llama.cpp mix name (`Q4_K_M`, `Q8_0`, ... chosen per tensor by `quantizers.kquant_mix`, as
llama-quantize does, fallbacks reported) or one GGML block type applied to every 2-D weight
(`Q4_K`, `Q5_0`, ..., like llama-quantize `--pure`). No importance matrix (that is `infq quantize
--method kquant`). A full-precision source is read tensor by tensor; a GPTQ/AWQ/compressed-tensors
or FP8 source is dequantized and quantized again, which loses accuracy (a warning says so). The file
carries llama metadata and the tokenizer (`formats.gguf_vocab`) and is written to `<out>.tmp`, then
renamed. To HF (`--to hf`): every tensor decoded to float16 (a quantized GGUF's blocks decoded
exactly, then rounded to fp16) into `model.safetensors`, config.json and generation_config.json
from the GGUF metadata, and a fast tokenizer rebuilt from the vocab (`gguf_tokenizer.save_hf_tokenizer`),
assembled in `.<out>.partial/` and renamed into place. Limits: llama architecture only.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from infq.errors import InfqError
from infq.formats.detect import detect_format
from infq.formats.hf import Checkpoint, read_config, resolve_model

FLOAT_TARGETS = ("F32", "F16")


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _types(qtype: str, shapes: dict[str, tuple[int, ...]], cfg: dict[str, Any], has_output: bool) -> tuple[dict[str, str], int | None, list[str]]:
    """GGML type per GGUF tensor name, general.file_type, fallback notes."""
    from infq.quantizers import kquant_mix, kquants

    q = qtype.upper()
    if q in FLOAT_TARGETS:
        return {n: (q if len(s) >= 2 and not n.endswith("_norm.weight") else "F32") for n, s in shapes.items()}, \
            (0 if q == "F32" else 1), []
    if q in kquant_mix.MIXES:
        heads = int(cfg["num_attention_heads"])
        model = kquant_mix.ModelShape(int(cfg["num_hidden_layers"]), heads,
                                      int(cfg.get("num_key_value_heads") or heads), has_output=has_output)
        plan = kquant_mix.plan_mix(q, shapes, model, has_imatrix=False)
        notes = [f"{f['tensor']}: {f['from']} -> {f['to']} ({f['why']})" for f in plan.fallbacks]
        return plan.types(), plan.file_type, notes
    if q in kquants.BLOCK_TYPES:
        block = kquants.block_type(q).block
        types = {}
        for n, s in shapes.items():
            if not kquant_mix.is_quantized(n, s):
                types[n] = "F32"
            elif s[-1] % block:
                raise InfqError(f"{n} has rows of {s[-1]}, not a multiple of {q}'s block of {block}; use a mix "
                                "(e.g. Q4_K_M), which falls back per tensor, or a 32-block type")
            else:
                types[n] = q
        return types, None, []
    raise InfqError(f"--type {qtype} is unknown; use F16, F32, a mix ({', '.join(kquant_mix.MIXES)}) or a GGML type "
                    f"({', '.join(kquants.BLOCK_TYPES)})")


def convert_to_gguf(src_name: str, out_name: str, qtype: str | None, force: bool) -> dict[str, Any]:
    """An HF (fp16/bf16/fp32) or packed checkpoint -> one llama GGUF file of type `qtype`."""
    from infq.formats.gguf import gguf_name, write_gguf_stream
    from infq.formats.gguf_vocab import tokenizer_metadata
    from infq.formats.inspect import _logical_shape
    from infq.formats.packed import PACKED_FORMATS, layout_from_config
    from infq.quantizers import kquants
    from infq.quantizers.scheme import QuantizedTensor

    start = time.perf_counter()
    if not qtype:
        raise InfqError("--to gguf needs --type: F16, F32, a mix such as Q4_K_M or Q8_0, or a GGML type such as Q4_K")
    src = resolve_model(src_name)
    fmt = detect_format(src)
    if fmt == "gguf":
        raise InfqError(f"{src} is already GGUF; convert it --to hf, or re-quantize the original model")
    out = Path(out_name)
    if out.exists() and not force:
        raise InfqError(f"{out} already exists; pass --force to replace it or choose another --out")
    hf_config = read_config(src)
    heads = int(hf_config.get("num_attention_heads") or 1)
    meta_config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    meta_config.update(rope_theta=_rope_theta(hf_config),
                       head_dim=int(hf_config.get("head_dim") or int(hf_config.get("hidden_size", 0)) // heads))
    ckpt = Checkpoint(src)
    layout = layout_from_config(fmt, hf_config["quantization_config"]) if fmt in PACKED_FORMATS else None
    modules = set(layout.modules(ckpt.keys())) if layout is not None else set()
    shapes: dict[str, tuple[int, ...]] = {}
    for name in ckpt.keys():
        module, _, part = name.rpartition(".")
        if name.endswith("rotary_emb.inv_freq") or (module in modules and part != layout.marker):  # type: ignore[union-attr]
            continue
        if module in modules:
            shapes[f"{module}.weight"] = tuple(_logical_shape(ckpt, module, layout))  # type: ignore[arg-type]
        else:
            shapes[name] = tuple(ckpt.shape(name))
    names = sorted(shapes, key=lambda n: _order(gguf_name(n)))  # also refuses tensors GGUF llama has no name for
    by_gguf = {gguf_name(n): shapes[n] for n in names}
    types, ftype, notes = _types(qtype, by_gguf, meta_config, has_output="lm_head.weight" in shapes)
    warnings = list(notes)
    if layout is not None:
        warnings.insert(0, f"{src} is {fmt}-quantized: its weights are dequantized and quantized again as {qtype}, "
                           "which loses accuracy; convert the full-precision model when you have it")
    tok, tok_warnings = tokenizer_metadata(src, int(meta_config["vocab_size"]))
    warnings += tok_warnings

    def produce(hf: str) -> Any:
        module = hf.removesuffix(".weight")
        w = layout.read(ckpt, module).dequantize(torch.float32) if module in modules else ckpt.get(hf)  # type: ignore[union-attr]
        t = types[gguf_name(hf)]
        if t in FLOAT_TARGETS:
            return w.to(torch.float32)
        return QuantizedTensor.from_gguf(kquants.quantize(w.to(torch.float32), t), t, (w.shape[0], w.shape[1]))

    entries = [(hf, shapes[hf], types[gguf_name(hf)]) for hf in names]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_gguf_stream(out, meta_config, entries, produce, tokenizer=tok, file_type=ftype)
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return {"src": str(src), "out": str(out), "from": fmt, "to": "gguf", "type": qtype.upper(), "file_type": ftype,
            "types": dict(sorted(counts.items())), "tensors": len(entries), "lossy": layout is not None,
            "bytes_after": out.stat().st_size, "seconds": round(time.perf_counter() - start, 3),
            "warnings": warnings, "tokenizer": None if tok is None else tok["model"]}


def _order(name: str) -> tuple[int, str]:
    """llama.cpp's loader order: tensors outside blocks first, then by layer, then by name."""
    parts = name.split(".")
    return (int(parts[1]) if parts[0] == "blk" else -1, name)


def convert_gguf_to_hf(src_name: str, out_name: str, force: bool) -> dict[str, Any]:
    """A llama GGUF file -> an fp16 HF folder (config, generation config, tokenizer, model.safetensors)."""
    from infq.formats.gguf_reader import GGUFFile
    from infq.formats.gguf_tokenizer import save_hf_tokenizer
    from infq.formats.safetensors_io import write_shards

    start = time.perf_counter()
    src = resolve_model(src_name)
    if detect_format(src) != "gguf":
        raise InfqError(f"{src} is not a GGUF file; --to hf converts .gguf files (other formats load as they are)")
    out = Path(out_name)
    if out.exists() and not force:
        raise InfqError(f"{out} already exists; pass --force to replace it or choose another --out")
    f = GGUFFile(src)
    quantized = sorted({f.ggml_type(n) for n in f.keys()} - {"F32", "F16", "BF16"})
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write_shards(tmp, _fp16_tensors(f))
        config = {**f.config, "torch_dtype": "float16", "dtype": "float16"}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        warnings = save_hf_tokenizer(f.path, f.meta, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    from infq.formats.convert import _replace  # convert.py imports this module lazily: no cycle

    _replace(tmp, out)
    if quantized:
        warnings.insert(0, f"the GGUF holds {', '.join(quantized)} blocks: the fp16 weights are their exact decoding "
                           "rounded to fp16, not the original model's weights")
    return {"src": str(src), "out": str(out), "from": "gguf", "to": "hf", "tensors": len(f.keys()),
            "bytes_after": sum(p.stat().st_size for p in out.iterdir()), "seconds": round(time.perf_counter() - start, 3),
            "warnings": warnings}


def _fp16_tensors(f: Any) -> Iterator[tuple[str, torch.Tensor]]:
    for name in sorted(f.keys()):
        w = f.dense(name)
        if not bool(torch.isfinite(w).all()) or float(w.abs().max()) > 65504.0:
            raise InfqError(f"{name} holds values float16 cannot represent; nothing was written")
        yield name, w.to(torch.float16)
