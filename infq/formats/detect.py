"""Name the checkpoint format of a path, from its contents (never from its file name alone).

A `.gguf` file (or any file starting with the GGUF magic) is `gguf`. A directory's config.json
decides the rest: no `quantization_config` -> `hf` (full precision); otherwise its `quant_method`
(`gptq`, `awq`, `fp8`, `compressed-tensors`), so every reader is chosen the way transformers and
vLLM choose theirs.
"""

from __future__ import annotations

from pathlib import Path

from infq.errors import InfqError
from infq.formats.hf import read_config

FORMATS = ("hf", "gptq", "awq", "fp8", "compressed-tensors", "gguf")
GGUF_MAGIC = b"GGUF"


def detect_format(path: Path) -> str:
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == GGUF_MAGIC:
                return "gguf"
        if path.suffix.lower() == ".gguf":
            raise InfqError(f"{path} is named .gguf but does not start with the GGUF magic; the file is corrupt, re-export it")
        raise InfqError(f"{path} is a file but not a GGUF model; pass a model directory or a .gguf file")
    qc = read_config(path).get("quantization_config")
    if not qc:
        return "hf"
    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else ""
    if method not in FORMATS:
        raise InfqError(
            f"{path}: quantization method {method!r} is not supported; "
            f"supported checkpoints: {', '.join(FORMATS)}"
        )
    return method
