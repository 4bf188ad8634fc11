"""What a checkpoint holds: architecture, parameter count, format, per-tensor scheme and size.

Every safetensors format returns the same plain dict, which `infq inspect` prints as a table or
as JSON: packed linears (GPTQ, AWQ, compressed-tensors, FP8; see formats.packed) are one logical
`<module>.weight` entry each, with their scheme and the bytes of all their parts. Parameter counts
are of the logical (unquantized) weights; bits per weight divide the bytes stored for the weights
by that count, so a 4-bit g128 GPTQ checkpoint reads about 4.25. A GGUF file lists its tensors
under HF names with their GGML types; its bits per weight are llama.cpp's (all tensor data, 1-D
F32 norms included, over all elements), and its summary names the mix (general.file_type), the
count of tensors per type and the imatrix it was quantized with, if any.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from infq.formats.detect import detect_format
from infq.formats.hf import Checkpoint, end_token_ids, read_config, resolve_model
from infq.formats.packed import PACKED_FORMATS, PackedLayout, layout_from_config

_DTYPE_NAMES = {
    "torch.float32": "f32", "torch.float16": "f16", "torch.bfloat16": "bf16",
    "torch.float64": "f64", "torch.int32": "i32", "torch.int64": "i64", "torch.int8": "i8",
    "torch.uint8": "u8", "torch.float8_e4m3fn": "f8_e4m3", "torch.float8_e5m2": "f8_e5m2",
}


def inspect_checkpoint(model: str) -> dict[str, Any]:
    path = resolve_model(model)
    fmt = detect_format(path)
    if fmt == "gguf":
        return _inspect_gguf(path)
    if fmt != "hf" and fmt not in PACKED_FORMATS:
        from infq.errors import InfqError

        raise InfqError(f"{path}: inspecting {fmt} checkpoints is not available in this version of infq")
    return _inspect_safetensors(path, fmt)


def _logical_shape(ckpt: Checkpoint, module: str, layout: PackedLayout) -> tuple[int, int]:
    """(out, in) of a packed linear from its stored shapes (weight_shape for compressed-tensors)."""
    if layout.is_fp8:  # the e4m3 weight keeps its (out, in) shape
        out, inp = ckpt.shape(f"{module}.weight")
        return out, inp
    rows, cols = ckpt.shape(f"{module}.{layout.marker}")
    if layout.format == "gptq":  # qweight (in*bits/32, out)
        return cols, rows * 32 // layout.config.bits
    if layout.format == "awq":  # qweight (in, out/8)
        return cols * 8, rows
    if f"{module}.weight_shape" in ckpt:  # weight_packed (out, ceil(in*bits/32))
        out, inp = (int(x) for x in ckpt.get(f"{module}.weight_shape").reshape(-1).tolist())
        return out, inp
    return rows, cols * 32 // layout.config.bits


def _packed_entry(ckpt: Checkpoint, module: str, layout: PackedLayout) -> dict[str, Any]:
    out, inp = _logical_shape(ckpt, module, layout)
    nbytes = sum(ckpt.nbytes(f"{module}.{p}") for p in layout.parts if f"{module}.{p}" in ckpt)
    return {"name": f"{module}.weight", "shape": [out, inp], "scheme": layout.describe(),
            "params": out * inp, "bytes": nbytes}


def _summary(qc: dict[str, Any], layout: PackedLayout | None) -> dict[str, Any]:
    if layout is None:
        return {}
    c = layout.config
    if layout.is_fp8:
        fp: dict[str, Any] = {"quant_method": layout.format, "weights": "float8_e4m3fn",
                              "weight_scale": c.weight_scale, "act_scheme": c.act_scheme}
        if layout.format == "compressed-tensors":
            fp["format"] = qc.get("format")
        return fp
    d: dict[str, Any] = {"quant_method": layout.format, "bits": c.bits, "group_size": c.group_size,
                         "sym": c.sym, "desc_act": c.desc_act}
    if layout.format == "gptq":
        d["checkpoint_format"] = layout.checkpoint_format
    elif layout.format == "awq":
        d["version"] = "gemm"
    else:
        d["format"] = qc.get("format", "pack-quantized")
    return d


def _inspect_safetensors(path: Path, fmt: str) -> dict[str, Any]:
    config = read_config(path)
    qc = config.get("quantization_config") or {}
    layout = layout_from_config(fmt, qc) if fmt != "hf" else None
    ckpt = Checkpoint(path)
    tensors = []
    params = stored = 0
    for name in sorted(ckpt.keys()):
        module, _, suffix = name.rpartition(".")
        if layout is not None and suffix == layout.marker:
            entry = _packed_entry(ckpt, module, layout)
        elif layout is not None and suffix in layout.parts and f"{module}.{layout.marker}" in ckpt:
            continue  # counted with its marker tensor
        else:
            shape = list(ckpt.shape(name))
            numel = 1
            for d in shape:
                numel *= d
            scheme = _DTYPE_NAMES.get(str(ckpt.dtype(name)), str(ckpt.dtype(name)))
            entry = {"name": name, "shape": shape, "scheme": scheme, "params": numel, "bytes": ckpt.nbytes(name)}
        params += entry["params"]
        stored += entry["bytes"]
        tensors.append(entry)
    dtypes = sorted({t["scheme"] for t in tensors if layout is None or not t["scheme"].startswith(layout.label + " ")})
    return {
        "path": str(path),
        "format": fmt,
        "quantization": _summary(qc, layout),
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "model_type": config.get("model_type"),
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "vocab_size": config.get("vocab_size"),
        "parameters": params,
        "dtype": ",".join(dtypes),
        "bytes_on_disk": ckpt.file_bytes(),
        "tensor_bytes": stored,
        "bits_per_weight": 8 * stored / params if params else 0.0,
        "tokenizer": _tokenizer_files(path, config),
        "tensors": tensors,
    }


def _tokenizer_files(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """What the directory holds for generation: tokenizer files, chat template (and where), end ids."""
    import json

    def read(name: str) -> dict[str, Any]:
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    files = [n for n in ("tokenizer.json", "tokenizer.model", "vocab.json") if (path / n).is_file()]
    source = None
    if read("tokenizer_config.json").get("chat_template"):
        source = "tokenizer_config.json"
    elif (path / "chat_template.jinja").is_file():
        source = "chat_template.jinja"
    elif read("chat_template.json").get("chat_template"):
        source = "chat_template.json"
    return {"files": files, "chat_template": source, "eos_token_ids": end_token_ids(path, config)}


# llama.cpp's llama_ftype values (general.file_type) -> names (reference §A.4.1)
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
               11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
               17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


def _inspect_gguf(path: Path) -> dict[str, Any]:
    from infq.formats.gguf import gguf_name
    from infq.formats.gguf_reader import GGUFFile

    f = GGUFFile(path)
    cfg, meta = f.config, f.meta
    tensors: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    params = stored = 0
    for name in sorted(f.keys()):
        shape = list(f.shape(name))
        numel = 1
        for d in shape:
            numel *= d
        qtype = f.ggml_type(name)
        counts[qtype] = counts.get(qtype, 0) + 1
        tensors.append({"name": name, "gguf_name": gguf_name(name), "shape": shape, "scheme": qtype,
                        "params": numel, "bytes": f.nbytes(name)})
        params += numel
        stored += f.nbytes(name)
    ftype = meta.get("general.file_type")
    quant: dict[str, Any] = {"quant_method": "gguf",
                             "file_type": _FILE_TYPES.get(ftype, ftype) if isinstance(ftype, int) else ftype,
                             "types": dict(sorted(counts.items())),
                             "tokenizer": meta.get("tokenizer.ggml.model")}
    for key in ("quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                "quantize.imatrix.chunks_count"):
        if key in meta:
            quant[key.removeprefix("quantize.")] = meta[key]
    return {
        "path": str(path),
        "format": "gguf",
        "quantization": quant,
        "architecture": str(meta.get("general.architecture")),
        "model_type": cfg["model_type"],
        "layers": cfg["num_hidden_layers"],
        "hidden_size": cfg["hidden_size"],
        "vocab_size": cfg["vocab_size"],
        "parameters": params,
        "dtype": ",".join(sorted(counts)),
        "bytes_on_disk": f.file_bytes(),
        "tensor_bytes": stored,
        "bits_per_weight": 8 * stored / params if params else 0.0,
        "tokenizer": {"files": [f"tokenizer.ggml ({meta['tokenizer.ggml.model']})"] if "tokenizer.ggml.model" in meta else [],
                      "chat_template": "tokenizer.chat_template" if meta.get("tokenizer.chat_template") else None,
                      "eos_token_ids": sorted({int(meta[k]) for k in ("tokenizer.ggml.eos_token_id",
                                                                      "tokenizer.ggml.eot_token_id",
                                                                      "tokenizer.ggml.eom_token_id")
                                               if isinstance(meta.get(k), int)})},
        "tensors": tensors,
    }
