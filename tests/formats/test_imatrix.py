"""llama.cpp imatrix files: hand-built .dat and .gguf files read back; our writes round trip and have
llama.cpp's layout (checked with gguf-py's reader and by unpacking the .dat bytes by hand)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from infq.errors import InfqError
from infq.formats.imatrix import Imatrix, read_imatrix, write_imatrix

gguf = pytest.importorskip("gguf")


def _dat(entries: list[tuple[str, int, np.ndarray]], chunks: int = 7, dataset: str = "wiki.train.raw") -> bytes:
    """llama-imatrix's legacy layout, written out field by field."""
    out = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        raw = name.encode()
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size)
        out += values.astype("<f4").tobytes()
    return out + struct.pack("<i", chunks) + struct.pack("<i", len(dataset)) + dataset.encode()


def test_hand_built_dat_reads_as_values_over_ncall(tmp_path: Path) -> None:
    v0 = np.array([2.0, 4.0, 6.0, 8.0], np.float32)  # = mean * ncall with ncall 2
    v1 = np.array([0.5, 1.5], np.float32)
    f = tmp_path / "imatrix.dat"
    f.write_bytes(_dat([("blk.0.attn_q.weight", 2, v0), ("blk.0.ffn_down.weight", 1, v1)]))
    im = read_imatrix(f)
    assert im.names() == ["blk.0.attn_q.weight", "blk.0.ffn_down.weight"]
    assert torch.equal(im.mean("blk.0.attn_q.weight"), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(im.mean("blk.0.ffn_down.weight"), torch.tensor([0.5, 1.5]))
    assert im.chunk_count == 7 and im.datasets == ["wiki.train.raw"]


def test_hand_built_gguf_imatrix(tmp_path: Path) -> None:
    """The layout llama-imatrix writes: general.type imatrix, <name>.in_sum2 / <name>.counts."""
    f = tmp_path / "imatrix.gguf"
    w = gguf.GGUFWriter(f, arch="llama")  # an extra architecture key must not matter
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["a.txt"])
    w.add_uint32("imatrix.chunk_count", 3)
    w.add_uint32("imatrix.chunk_size", 512)
    w.add_tensor("blk.0.attn_v.weight.in_sum2", np.array([[3.0, 6.0, 0.0]], np.float32))
    w.add_tensor("blk.0.attn_v.weight.counts", np.array([[1.5]], np.float32))
    w.add_tensor("blk.1.attn_v.weight.in_sum2", np.array([[3.0, 6.0, 0.0]], np.float32))
    w.add_tensor("blk.1.attn_v.weight.counts", np.array([[0.0]], np.float32))  # never seen -> ones
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    im = read_imatrix(f)
    assert torch.equal(im.mean("blk.0.attn_v.weight"), torch.tensor([2.0, 4.0, 0.0]))
    assert torch.equal(im.mean("blk.1.attn_v.weight"), torch.ones(3))
    assert (im.chunk_count, im.chunk_size, im.datasets) == (3, 512, ["a.txt"])


def _sample() -> Imatrix:
    g = torch.Generator().manual_seed(0)
    means = {"blk.0.attn_q.weight": torch.rand(256, generator=g), "blk.1.ffn_down.weight": torch.rand(768, generator=g)}
    return Imatrix.from_means(means, dict.fromkeys(means, 4096), ["demo"], chunk_count=8, chunk_size=512)


def test_gguf_round_trip_and_layout(tmp_path: Path) -> None:
    im = _sample()
    f = write_imatrix(tmp_path / "m.gguf", im)
    back = read_imatrix(f)
    for n in im.names():  # float32 storage of sums and counts: relative 1e-6
        assert torch.allclose(back.mean(n), im.mean(n), rtol=1e-6, atol=0)
    assert (back.chunk_count, back.chunk_size, back.datasets) == (8, 512, ["demo"])
    r = gguf.GGUFReader(f)
    assert r.fields["general.type"].contents() == "imatrix" and "general.architecture" not in r.fields
    t = {x.name: x for x in r.tensors}
    assert t["blk.0.attn_q.weight.in_sum2"].shape.tolist() == [256, 1]  # ggml ne [n_in, n_mat]
    assert t["blk.0.attn_q.weight.counts"].shape.tolist() == [1, 1]
    assert float(np.asarray(t["blk.0.attn_q.weight.counts"].data).reshape(-1)[0]) == 4096.0


def test_dat_round_trip_and_bytes(tmp_path: Path) -> None:
    im = _sample()
    f = write_imatrix(tmp_path / "m.dat", im)
    back = read_imatrix(f)
    for n in im.names():
        assert torch.allclose(back.mean(n), im.mean(n), rtol=1e-6, atol=0)
    data = f.read_bytes()  # first entry by hand: ncall = ceil(4096 / 512) = 8, values = mean * 8
    (n_entries, length) = struct.unpack("<ii", data[:8])
    name = data[8:8 + length].decode()
    ncall, nval = struct.unpack("<ii", data[8 + length:16 + length])
    values = np.frombuffer(data[16 + length:16 + length + 4 * nval], "<f4")
    assert (n_entries, name, ncall, nval) == (2, "blk.0.attn_q.weight", 8, 256)
    assert np.allclose(values, im.mean(name).numpy() * 8, rtol=1e-6)
    assert back.chunk_count == 8 and back.datasets == ["demo"]


def test_bad_files_one_line_errors(tmp_path: Path) -> None:
    f = tmp_path / "bad.dat"
    f.write_bytes(struct.pack("<i", 1000000) + b"xx")
    with pytest.raises(InfqError, match="claims 1000000 entries"):
        read_imatrix(f)
    good = _dat([("blk.0.attn_q.weight", 1, np.ones(64, np.float32))])
    f.write_bytes(good[:40])
    with pytest.raises(InfqError, match="truncated"):
        read_imatrix(f)
    f.write_bytes(_dat([("blk.0.attn_q.weight", 1, np.array([1.0, np.nan], np.float32))]))
    with pytest.raises(InfqError, match="non-finite"):
        read_imatrix(f)
    with pytest.raises(InfqError, match="does not exist"):
        read_imatrix(tmp_path / "nope.dat")
    im = _sample()
    with pytest.raises(InfqError, match="no entry for blk.2.attn_q.weight"):
        im.check_against({"blk.2.attn_q.weight": 256}, "x.dat")
    with pytest.raises(InfqError, match="holds 256 values"):
        im.check_against({"blk.0.attn_q.weight": 512}, "x.dat")


def test_gguf_model_or_corrupt_file_is_not_an_imatrix(tmp_path: Path) -> None:
    f = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(f, arch="llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InfqError, match="not an imatrix"):
        read_imatrix(f)
    f.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 10**12, 10**12))
    with pytest.raises(InfqError, match="corrupt or truncated"):
        read_imatrix(f)
