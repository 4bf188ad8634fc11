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
    if fmt != "hf":
        from infq.errors import InfqError

        raise InfqError(f"{path}: inspecting {fmt} checkpoints is not available in this version of infq")
    return _inspect_hf(path)


def _inspect_hf(path: Path) -> dict[str, Any]:
    config = read_config(path)
    ckpt = Checkpoint(path)
    tensors = []
    params = stored = 0
    for name in sorted(ckpt.keys()):
        shape = list(ckpt.shape(name))
        numel = 1
        for d in shape:
            numel *= d
        nbytes = ckpt.nbytes(name)
        params += numel
        stored += nbytes
        scheme = _DTYPE_NAMES.get(str(ckpt.dtype(name)), str(ckpt.dtype(name)))
        tensors.append({"name": name, "shape": shape, "scheme": scheme, "params": numel, "bytes": nbytes})
    dtypes = sorted({t["scheme"] for t in tensors})
    return {
        "path": str(path),
        "format": "hf",
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
