"""What a checkpoint holds: architecture, parameter count, format, per-tensor scheme and size.

One function per format returns the same plain dict, which `infq inspect` prints as a table or
as JSON. Parameter counts are of the logical (unquantized) weights; bits per weight divide the
bytes stored for the weights by that count, so a 4-bit g128 GPTQ checkpoint reads about 4.25.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from infq.formats.detect import detect_format
from infq.formats.hf import Checkpoint, read_config, resolve_model

_DTYPE_NAMES = {
    "torch.float32": "f32", "torch.float16": "f16", "torch.bfloat16": "bf16",
    "torch.float64": "f64", "torch.int32": "i32", "torch.int64": "i64", "torch.int8": "i8",
    "torch.uint8": "u8", "torch.float8_e4m3fn": "f8_e4m3", "torch.float8_e5m2": "f8_e5m2",
}


def inspect_checkpoint(model: str) -> dict[str, Any]:
    path = resolve_model(model)
    fmt = detect_format(path)
    if fmt not in ("hf", "gptq"):
        from infq.errors import InfqError

        raise InfqError(f"{path}: inspecting {fmt} checkpoints is not available in this version of infq")
    return _inspect_safetensors(path, fmt)


_GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def _gptq_entry(ckpt: Checkpoint, module: str, qc: dict[str, Any]) -> dict[str, Any]:
    bits = int(qc.get("bits", 4))
    packed_in, out = ckpt.shape(f"{module}.qweight")
    inp = packed_in * 32 // bits
    gs = int(qc.get("group_size", -1))
    sym = "sym" if qc.get("sym", True) else "asym"
    act = " act-order" if qc.get("desc_act") else ""
    nbytes = sum(ckpt.nbytes(f"{module}.{p}") for p in _GPTQ_PARTS if f"{module}.{p}" in ckpt)
    scheme = f"gptq int{bits} g{gs if gs > 0 else 'channel'} {sym}{act}"
    return {"name": f"{module}.weight", "shape": [out, inp], "scheme": scheme, "params": out * inp, "bytes": nbytes}


def _inspect_safetensors(path: Path, fmt: str) -> dict[str, Any]:
    config = read_config(path)
    qc = config.get("quantization_config") or {}
    ckpt = Checkpoint(path)
    tensors = []
    params = stored = 0
    for name in sorted(ckpt.keys()):
        if name.endswith(".qweight"):
            entry = _gptq_entry(ckpt, name.removesuffix(".qweight"), qc)
        elif name.rsplit(".", 1)[-1] in _GPTQ_PARTS[1:] and name.rsplit(".", 1)[0] + ".qweight" in ckpt:
            continue  # counted with its qweight
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
    dtypes = sorted({t["scheme"] for t in tensors if not t["scheme"].startswith("gptq")})
    return {
        "path": str(path),
        "format": fmt,
        "quantization": {k: qc[k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format") if k in qc},
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
        "tensors": tensors,
    }
