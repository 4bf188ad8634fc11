"""Zero-copy, validated reading of safetensors files.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON naming every
tensor's dtype, shape and byte range, then the raw data (reference A.0). `SafetensorsFile` parses
and checks the header against the file size up front, so a truncated or corrupt file fails with
one line instead of a crash deep inside a forward pass, then hands out tensors that are views of a
memory map: opening a 100 GB checkpoint costs nothing until a tensor is touched, and touching one
tensor pages in only its bytes. `SafetensorsWriter` writes a file one tensor at a time, and
`write_shards` cuts a stream of (name, tensor) pairs into shards plus their index; both are
format-agnostic (every writer in infq.formats uses them).
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from infq.errors import InfqError

# safetensors dtype tag -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


class StoredTensor:
    """A tensor left in its safetensors file, for copying through to another file in chunks: the
    writer streams its bytes (`chunks`) and never holds it whole. A quantized checkpoint passes its
    embeddings and lm_head (131 MiB each at TinyLlama's size) through this way."""

    CHUNK = 16 << 20

    def __init__(self, path: Path, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.path, self.offset, self.nbytes = path, offset, nbytes
        self.dtype, self.shape = dtype, torch.Size(shape)

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def chunks(self) -> Iterable[bytes]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            left = self.nbytes
            while left:
                chunk = f.read(min(self.CHUNK, left))
                if not chunk:
                    raise InfqError(f"{self.path} is truncated: it ended while being copied; re-download it")
                left -= len(chunk)
                yield chunk


class SafetensorsFile:
    """One memory-mapped safetensors file; `get(name)` returns a read-only-by-convention view."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        fix = f"re-download or re-write {self.path.name}"
        if size < 8:
            raise InfqError(f"{self.path} is truncated ({size} bytes, no header); {fix}")
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > _MAX_HEADER or 8 + n > size:
                raise InfqError(f"{self.path} has a corrupt or truncated header; {fix}")
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InfqError(f"{self.path} has a corrupt header ({type(e).__name__}); {fix}") from None
        if not isinstance(header, dict):
            raise InfqError(f"{self.path} has a corrupt header (not a JSON object); {fix}")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self._entries[name] = self._check_entry(name, info, size - self._data_start, fix)
        self._map: np.memmap | None = None

    def _check_entry(
        self, name: str, info: object, data_size: int, fix: str
    ) -> tuple[str, tuple[int, ...], int, int]:
        try:
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])  # type: ignore[index]
            begin, end = (int(x) for x in info["data_offsets"])  # type: ignore[index]
        except (TypeError, KeyError, ValueError):
            raise InfqError(f"{self.path}: tensor {name!r} has a corrupt entry; {fix}") from None
        if dtype not in DTYPES:
            raise InfqError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
        count = int(np.prod(shape)) if shape else 1
        if end > data_size:
            raise InfqError(f"{self.path} is truncated: tensor {name!r} lies past the end; {fix}")
        if begin < 0 or end - begin != count * DTYPES[dtype][1]:
            raise InfqError(f"{self.path}: tensor {name!r} size disagrees with its shape; {fix}")
        return dtype, shape, begin, end

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entries[name][0]][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self._entries[name]
        return end - begin

    def read(self, name: str) -> torch.Tensor:
        """The tensor read into fresh memory (freed with the tensor; no file pages stay mapped)."""
        dtype_tag, shape, begin, end = self._entries[name]
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            if f.readinto(buf) != len(buf):
                raise InfqError(f"{self.path} is truncated: tensor {name!r} could not be read whole")
        if not buf:
            return torch.empty(shape, dtype=DTYPES[dtype_tag][0])
        return torch.frombuffer(buf, dtype=torch.uint8).view(DTYPES[dtype_tag][0]).reshape(shape)

    def stored(self, name: str) -> StoredTensor:
        """The tensor where it lies in the file, to be copied through in chunks."""
        dtype_tag, shape, begin, end = self._entries[name]
        return StoredTensor(self.path, self._data_start + begin, end - begin, DTYPES[dtype_tag][0], shape)

    def get(self, name: str) -> torch.Tensor:
        """The tensor as a view of the memory map (copy-on-write: writes never reach the file)."""
        dtype_tag, shape, begin, end = self._entries[name]
        if self._map is None:
            if self.path.stat().st_size == self._data_start:  # header only, no data
                return torch.empty(shape, dtype=DTYPES[dtype_tag][0])
            self._map = np.memmap(self.path, dtype=np.uint8, mode="c")
        torch_dtype = DTYPES[dtype_tag][0]
        if end == begin:
            return torch.empty(shape, dtype=torch_dtype)
        raw = self._map[self._data_start + begin : self._data_start + end]
        return torch.from_numpy(raw).view(torch_dtype).reshape(shape)

    def close(self) -> None:
        if self._map is not None:
            mm = self._map._mmap  # type: ignore[attr-defined]
            self._map = None
            if isinstance(mm, mmap.mmap):
                try:
                    mm.close()
                except BufferError:  # a tensor still views it; the OS frees it with the last view
                    pass


_TAGS = {dtype: tag for tag, (dtype, _) in DTYPES.items()}


class SafetensorsWriter:
    """Writes a safetensors file one tensor at a time, holding none of them in memory.

    Tensor bytes go to `<path>.data` as they come; `close()` writes the header and then copies the
    data behind it, so memory stays at one tensor whatever the file's size. The `safetensors`
    library's own writer needs every tensor of a file in memory at once.
    """

    def __init__(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._data_path = self.path.with_name(self.path.name + ".data")
        self._data = open(self._data_path, "wb")  # noqa: SIM115 (closed in close/abort)
        self._header: dict[str, object] = {}
        self._metadata = dict(metadata or {})
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._header)

    def add(self, name: str, tensor: torch.Tensor | StoredTensor) -> None:
        """Append one tensor's bytes; a `StoredTensor` is copied from its file in chunks."""
        if name in self._header:
            raise ValueError(f"tensor {name!r} was given twice")
        if tensor.dtype not in _TAGS:
            raise ValueError(f"dtype {tensor.dtype} has no safetensors tag")
        if isinstance(tensor, StoredTensor):
            n = tensor.nbytes
            for chunk in tensor.chunks():
                self._data.write(chunk)
        else:
            t = tensor.detach().cpu().contiguous()
            n = t.numel() * t.element_size()
            if n:
                self._data.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._header[name] = {"dtype": _TAGS[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.nbytes, self.nbytes + n]}
        self.nbytes += n

    def close(self) -> None:
        self._data.close()
        header = dict(self._header)
        if self._metadata:
            header["__metadata__"] = self._metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            while chunk := data.read(1 << 24):
                out.write(chunk)
        self._data_path.unlink()

    def abort(self) -> None:
        self._data.close()
        self._data_path.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


def write_shards(
    out_dir: str | os.PathLike[str],
    tensors_iter: Iterable[tuple[str, torch.Tensor | StoredTensor]],
    max_shard_bytes: int = 5 * 2**30,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Stream (name, tensor) pairs into safetensors shards in `out_dir`; returns the weight map.

    Holds at most one tensor in memory (SafetensorsWriter); a new shard starts before a tensor that would push it past
    `max_shard_bytes` (a single larger tensor gets a shard of its own). One shard is named
    model.safetensors; several are renamed to model-0000k-of-0000n.safetensors at the end and
    described by model.safetensors.index.json. Writes only inside `out_dir`, which must exist and
    hold no model*.safetensors yet.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise InfqError(f"output directory {out} does not exist; create it first")
    if any(p.name.startswith("model") and ".safetensors" in p.name for p in out.iterdir()):
        raise InfqError(f"{out} already holds model*.safetensors files; write into an empty directory")
    if max_shard_bytes <= 0:
        raise InfqError(f"max_shard_bytes {max_shard_bytes} must be positive, e.g. 5 GiB")
    meta = {"format": "pt", **(metadata or {})}
    shard_of: dict[str, int] = {}  # tensor name -> shard number (0-based)
    partial: list[Path] = []
    writer: SafetensorsWriter | None = None
    total = 0
    try:
        for name, tensor in tensors_iter:
            if name in shard_of:
                raise ValueError(f"tensor {name!r} was given twice")
            nbytes = tensor.numel() * tensor.element_size()
            if writer is not None and len(writer) and writer.nbytes + nbytes > max_shard_bytes:
                writer.close()
                writer = None
            if writer is None:
                partial.append(out / f"model-{len(partial) + 1:05d}.safetensors.partial")
                writer = SafetensorsWriter(partial[-1], meta)
            writer.add(name, tensor)
            del tensor  # else it stays alive while the stream produces the next one: two in memory
            shard_of[name] = len(partial) - 1
            total += nbytes
        if writer is None:
            raise ValueError("no tensors to write")
        writer.close()
        writer = None
        names = _shard_names(len(partial))
        for src, dst in zip(partial, names, strict=True):
            os.replace(src, out / dst)
    except BaseException:  # leave no half-written checkpoint (the directory held none at the start)
        if writer is not None:
            writer.abort()
        for p in partial + [out / n for n in _shard_names(len(partial))] if partial else []:
            p.unlink(missing_ok=True)
        raise
    weight_map = {name: names[k] for name, k in shard_of.items()}
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        tmp = out / "model.safetensors.index.json.partial"
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, out / "model.safetensors.index.json")
    return weight_map
