"""llama.cpp importance-matrix files, both layouts, read and written (reference §A.4.4).

An importance matrix holds, per weight tensor (GGUF name, `blk.N.attn_q.weight`), the sum over
calibration tokens of x_j^2 for every input column j and the number of tokens summed; quantizers
use the mean, `sums / count`. `Imatrix` keeps exactly that, plus the datasets, chunk count and
chunk size the file records.

* GGUF container (llama-imatrix's default since mid-2025): no architecture key, `general.type` =
  "imatrix", `imatrix.datasets` (string array), `imatrix.chunk_count` and `imatrix.chunk_size`
  (u32); per weight two F32 tensors, `<name>.in_sum2` (ne [n_in, n_mat]) and `<name>.counts`
  (ne [1, n_mat]). A count of 0 means "never seen" and reads as importance 1, as llama.cpp does.
* Legacy `.dat`: i32 n_entries; per entry i32 name length, the name (no NUL), i32 ncall, i32 nval,
  nval f32 values = mean * ncall; then i32 chunk count and i32 length + dataset name. llama.cpp
  writes ncall = ceil(tokens / chunk_size) and reads the mean back as values / ncall.
`read_imatrix` picks the layout by the file's magic; `write_imatrix` by the extension (`.gguf`, else
`.dat`) and writes through a temporary file renamed when complete. Limits: dense models only (one
matrix per tensor: an MoE file with n_mat > 1 is refused).
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infq.errors import InfqError

DEFAULT_CHUNK_SIZE = 512  # llama-imatrix's default context: what a .dat file's counts are in units of


@dataclass
class Imatrix:
    """Per-tensor sums of x^2 (float64 (n_in,)) and token counts, under GGUF tensor names."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def mean(self, name: str) -> torch.Tensor:
        """(n_in,) float32 mean x^2 of tensor `name`; all ones for a tensor never seen (count 0)."""
        s, c = self.sums[name], self.counts[name]
        if c <= 0:
            return torch.ones(s.shape[0], dtype=torch.float32)
        return torch.from_numpy(s / c).to(torch.float32)

    def names(self) -> list[str]:
        return sorted(self.sums)

    @classmethod
    def from_means(cls, means: Mapping[str, torch.Tensor], tokens: Mapping[str, int], datasets: list[str],
                   chunk_count: int, chunk_size: int) -> Imatrix:
        """From per-tensor mean x^2 and token counts (what the calibration driver collects)."""
        sums = {n: means[n].detach().double().cpu().numpy() * float(tokens[n]) for n in means}
        return cls(sums, {n: float(tokens[n]) for n in means}, list(datasets), int(chunk_count), int(chunk_size))

    def check_against(self, expected: Mapping[str, int], source: str) -> None:
        """Every tensor in `expected` (GGUF name -> input size) present with that many values."""
        missing = [n for n in expected if n not in self.sums]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise InfqError(f"imatrix {source} has no entry for {missing[0]}{more}; it was computed for "
                            "another model: recompute it (drop --imatrix) or pass --no-imatrix")
        for n, size in expected.items():
            if self.sums[n].shape[0] != size:
                raise InfqError(f"imatrix {source} holds {self.sums[n].shape[0]} values for {n}, whose rows "
                                f"have {size}; it belongs to another model: recompute it")


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read a llama.cpp imatrix file, GGUF or legacy .dat (chosen by the magic bytes)."""
    path = Path(path)
    if not path.is_file():
        raise InfqError(f"imatrix file {path} does not exist; pass an existing .dat or .gguf file")
    with path.open("rb") as f:
        magic = f.read(4)
    im = _read_gguf(path) if magic == b"GGUF" else _read_dat(path)
    for name, s in im.sums.items():
        if not np.isfinite(s).all() or (s < 0).any():
            raise InfqError(f"imatrix {path} holds negative or non-finite values for {name}; recompute it")
    return im


def _read_dat(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise InfqError(f"imatrix {path} is truncated or not an imatrix file (at {what}); "
                            "pass a llama-imatrix .dat or .gguf file")
        pos += n
        return data[pos - n:pos]

    (n_entries,) = struct.unpack("<i", take(4, "the entry count"))
    if n_entries < 1 or n_entries * 16 > len(data):
        raise InfqError(f"imatrix {path} claims {n_entries} entries in {len(data)} bytes; it is not a "
                        "llama-imatrix file or is corrupt")
    im = Imatrix()
    for i in range(n_entries):
        (length,) = struct.unpack("<i", take(4, f"entry {i}"))
        try:
            name = take(length, f"entry {i}'s name").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InfqError(f"imatrix {path}: entry {i}'s name is not UTF-8; the file is corrupt") from exc
        ncall, nval = struct.unpack("<ii", take(8, f"{name}'s counts"))
        if nval < 1:
            raise InfqError(f"imatrix {path}: {name} has {nval} values; the file is corrupt")
        values = np.frombuffer(take(4 * nval, f"{name}'s values"), dtype="<f4").astype(np.float64)
        # llama-quantize's mean is values / ncall; keep it as sums over ncall chunks of chunk_size tokens
        calls = max(ncall, 1)
        im.sums[name] = values / calls * (calls * DEFAULT_CHUNK_SIZE)
        im.counts[name] = float(calls * DEFAULT_CHUNK_SIZE)
    if pos + 4 <= len(data):
        (im.chunk_count,) = struct.unpack("<i", take(4, "the chunk count"))
        if pos + 4 <= len(data):
            (length,) = struct.unpack("<i", take(4, "the dataset name"))
            if 0 <= length <= len(data) - pos:
                im.datasets = [take(length, "the dataset name").decode("utf-8", "replace")]
    return im


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    from infq.formats.gguf import _check_header

    _check_header(path)  # counts against the file size before the parser allocates per count
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, struct.error, OverflowError) as exc:
        raise InfqError(f"imatrix {path} is not a readable GGUF file ({exc}); re-create it") from exc

    def field_value(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    gtype = field_value("general.type")
    parts: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        for suffix in (".in_sum2", ".counts"):
            if t.name.endswith(suffix):
                parts.setdefault(t.name[: -len(suffix)], {})[suffix] = np.asarray(t.data, dtype=np.float64)
    if gtype != "imatrix" and not parts:
        raise InfqError(f"{path} is a GGUF file but not an imatrix (general.type {gtype!r}); pass an "
                        "imatrix made by llama-imatrix or infq --imatrix-out")
    im = Imatrix(datasets=[str(d) for d in (field_value("imatrix.datasets") or [])],
                 chunk_count=int(field_value("imatrix.chunk_count") or 0),
                 chunk_size=int(field_value("imatrix.chunk_size") or DEFAULT_CHUNK_SIZE))
    for name, p in sorted(parts.items()):
        if ".in_sum2" not in p or ".counts" not in p:
            raise InfqError(f"imatrix {path}: {name} has sums without counts or counts without sums; re-create it")
        sums, counts = p[".in_sum2"], p[".counts"].reshape(-1)
        if counts.size != 1 or sums.size == 0:
            raise InfqError(f"imatrix {path}: {name} holds {counts.size} matrices (an MoE model); infq "
                            "reads dense-model imatrices only")
        im.sums[name] = sums.reshape(-1).copy()
        im.counts[name] = float(counts[0])
    return im


def write_imatrix(path: str | os.PathLike[str], im: Imatrix) -> Path:
    """Write `im` as GGUF when the name ends in .gguf, else as legacy .dat; temp file, then rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if path.suffix.lower() == ".gguf":
            _write_gguf(tmp, im)
        else:
            tmp.write_bytes(_dat_bytes(im))
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InfqError(f"could not write the imatrix to {path} ({exc}); check the folder and free space") from exc
    os.replace(tmp, path)
    return path


def _dat_bytes(im: Imatrix) -> bytes:
    out = [struct.pack("<i", len(im.sums))]
    chunk = max(im.chunk_size, 1)
    for name in im.names():
        raw = name.encode("utf-8")
        count = im.counts[name]
        ncall = max(1, math.ceil(count / chunk))
        mean = im.sums[name] / count if count > 0 else np.ones_like(im.sums[name])
        values = (mean * ncall).astype("<f4")
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size), values.tobytes()]
    dataset = (im.datasets[-1] if im.datasets else "").encode("utf-8")
    out += [struct.pack("<i", im.chunk_count), struct.pack("<i", len(dataset)), dataset]
    return b"".join(out)


def _write_gguf(tmp: Path, im: Imatrix) -> None:
    import gguf

    class _NoArchWriter(gguf.GGUFWriter):  # an imatrix file names no architecture
        def add_architecture(self) -> None:
            pass

    w = _NoArchWriter(tmp, arch="")
    w.add_type("imatrix")
    if im.datasets:
        w.add_array("imatrix.datasets", list(im.datasets))
    w.add_uint32("imatrix.chunk_count", int(im.chunk_count))
    w.add_uint32("imatrix.chunk_size", int(im.chunk_size))
    for name in im.names():
        w.add_tensor(f"{name}.in_sum2", im.sums[name].astype(np.float32).reshape(1, -1))  # ne [n_in, 1]
        w.add_tensor(f"{name}.counts", np.array([[im.counts[name]]], dtype=np.float32))  # ne [1, 1]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
