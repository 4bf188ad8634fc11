"""Staging of finished blocks, so an interrupted `infq quantize` can resume.

Each finished block's quantized tensors are saved in canonical form (unpacked codes, scales,
zeros, g_idx; no format packing) to `<partial>/blocks/NNNNN.safetensors`, beside `state.json`
holding a fingerprint of the model, the calibration data and the config. A rerun with `--resume`
whose fingerprint matches loads the staged blocks and continues with the next block; the final
checkpoint is assembled from the staged blocks, so a resumed run writes byte-identical output.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from infq.errors import InfqError
from infq.formats.safetensors_io import SafetensorsWriter
from infq.quantizers.calibrate import BlockResult
from infq.quantizers.scheme import QuantizedTensor, QuantScheme

_PARTS = ("codes", "scales", "zeros", "g_idx", "input_scale")
_DENSE = "dense:"


def fingerprint(hf_config: dict[str, Any], weight_files: list[Path], config: dict[str, Any],
                windows: Tensor | None) -> str:
    """Hash of what determines the output: config.json, the weight files' headers, sizes, the data."""
    h = hashlib.sha256()
    h.update(json.dumps(hf_config, sort_keys=True).encode())
    h.update(json.dumps(config, sort_keys=True).encode())
    for f in weight_files:
        with open(f, "rb") as fh:
            head = fh.read(1 << 20)  # safetensors: the header (names, dtypes, offsets)
        h.update(f.name.encode() + str(f.stat().st_size).encode() + head)
    if windows is not None:
        h.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


class Stage:
    def __init__(self, path: Path, fp: str) -> None:
        self.path, self.fp = path, fp
        self.blocks = path / "blocks"

    def start(self, resume: bool) -> list[BlockResult]:
        """Open the staging dir; returns the finished blocks to resume from (empty when fresh)."""
        state = self.path / "state.json"
        if self.path.exists():
            if not resume:
                raise InfqError(
                    f"an interrupted run of this output exists at {self.path}; pass --resume to continue it "
                    "or --force to start over"
                )
            if not state.is_file() or json.loads(state.read_text()).get("fingerprint") != self.fp:
                raise InfqError(
                    f"{self.path} was made from another model, dataset or config; rerun with the same "
                    "settings, or --force to start over"
                )
            return self._load()
        self.blocks.mkdir(parents=True)
        state.write_text(json.dumps({"fingerprint": self.fp}))
        return []

    def _load(self) -> list[BlockResult]:
        done = []
        for i in range(len(list(self.blocks.glob("*.safetensors")))):
            f = self.blocks / f"{i:05d}.safetensors"
            if not f.is_file():
                break
            done.append(self.read(i))
        return done

    def save(self, result: BlockResult) -> None:
        """Write the block's results to its stage file, one tensor at a time (no second copy of
        the block's codes in memory, as a whole-dict serializer would make)."""
        tensors: dict[str, Tensor] = {}
        meta = {}
        for name, qt in result.tensors.items():
            for part in _PARTS:
                value = getattr(qt, part)
                if value is not None:
                    tensors[f"{name}.{part}"] = value
            meta[name] = json.dumps({"scheme": qt.scheme.__dict__, "shape": list(qt.shape)})
        for name, t in result.dense.items():  # full-precision tensors the method replaced (AWQ norms)
            tensors[f"{_DENSE}{name}"] = t
        meta["__info__"] = json.dumps(result.info)
        final = self.blocks / f"{result.index:05d}.safetensors"
        tmp = final.with_suffix(".partial")
        writer = SafetensorsWriter(tmp, meta)
        try:
            for key in sorted(tensors):
                writer.add(key, tensors[key])
            writer.close()
        except BaseException:
            writer.abort()
            raise
        tmp.rename(final)  # a block counts as done only once its file is whole

    def read(self, i: int) -> BlockResult:
        f = self.blocks / f"{i:05d}.safetensors"
        from safetensors import safe_open

        with safe_open(str(f), "pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(f))
        result = BlockResult(i, {}, json.loads(meta.pop("__info__", "{}")))
        result.dense = {k.removeprefix(_DENSE): t for k, t in tensors.items() if k.startswith(_DENSE)}
        for name, desc in sorted(meta.items()):  # safetensors metadata comes back unordered
            d = json.loads(desc)
            result.tensors[name] = QuantizedTensor(
                **{p: tensors.get(f"{name}.{p}") for p in _PARTS},
                scheme=QuantScheme(**d["scheme"]), shape=tuple(d["shape"]),
            )
        return result
