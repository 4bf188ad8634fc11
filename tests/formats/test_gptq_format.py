"""GPTQ format: reference §E.1 test vectors, pack/unpack identities, a checkpoint built by
plain-Python integer loops (the oracle, independent of infq's packer), configs, and sharded writing.
All comparisons are exact: packing is lossless and (q - z) * fp16 scale is exact in fp32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from infq.errors import InfqError
from infq.formats.gptq import (
    gptq_quantization_config,
    gptq_quantize_config_json,
    gptq_to_quantized_tensor,
    pack_cols,
    pack_rows,
    parse_gptq_config,
    quantized_tensor_to_gptq,
    unpack_cols,
    unpack_rows,
    write_gptq_shards,
)
from infq.quantizers.rtn import fake_quantize, quantize_rtn
from infq.quantizers.scheme import QuantConfig, QuantizedTensor, QuantScheme


def u32(a: np.ndarray) -> list[int]:
    return [int(x) for x in np.asarray(a).view(np.uint32).ravel()]


def to_i32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


# ----------------------------------------------------------------- the oracle: Python integers only


def oracle_pack_column(values: list[int], bits: int) -> list[int]:
    """LSB-first bit stream (value k at bits [k*bits, k*bits+bits)) cut into 32-bit words."""
    stream = 0
    for k, v in enumerate(values):
        stream |= v << (k * bits)
    return [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(len(values) * bits // 32)]


def oracle_checkpoint(codes, zeros, scales, g_idx, bits, fmt):
    """codes [in][out], zeros [G][out] (true zeros), scales [G][out] -> GPTQ tensors via loops."""
    inp, out, n_groups = len(codes), len(codes[0]), len(zeros)
    qweight = [[0] * out for _ in range(inp * bits // 32)]
    for o in range(out):
        for r, word in enumerate(oracle_pack_column([codes[i][o] for i in range(inp)], bits)):
            qweight[r][o] = to_i32(word)
    shift = 1 if fmt == "gptq" else 0
    qzeros = [[to_i32(w) for w in oracle_pack_column([z - shift for z in zeros[g]], bits)]
              for g in range(n_groups)]
    return {
        "qweight": torch.tensor(qweight, dtype=torch.int32),
        "qzeros": torch.tensor(qzeros, dtype=torch.int32),
        "scales": torch.tensor(scales, dtype=torch.float16),
        "g_idx": torch.tensor(g_idx, dtype=torch.int32),
    }


# ----------------------------------------------------------------- §E test vectors


def test_4bit_vector() -> None:
    assert u32(pack_rows(np.arange(8).reshape(8, 1), 4)) == [0x76543210]


def test_2bit_and_8bit_vectors() -> None:
    assert u32(pack_rows(np.tile(np.arange(4), 4).reshape(16, 1), 2)) == [0xE4E4E4E4]
    assert u32(pack_rows(np.array([[0x10], [0x20], [0x30], [0x40]]), 8)) == [0x40302010]


def test_3bit_cycle_matches_spec_word_layout() -> None:
    c = [(7 * k + 3) % 8 for k in range(32)]  # every code 0..7, varied neighbours
    # §A.1.4 word by word: rows 0-9 at 0,3,..,27 + low 2 bits of row 10 at 30-31; bit 2 of row 10,
    # rows 11-20 at 1,4,..,28, low bit of row 21 at 31; bits 1-2 of row 21, rows 22-31 at 2,5,..,29.
    w0 = sum(c[r] << (3 * r) for r in range(10)) | (c[10] & 3) << 30
    w1 = (c[10] >> 2) | sum(c[11 + i] << (1 + 3 * i) for i in range(10)) | (c[21] & 1) << 31
    w2 = (c[21] >> 1) | sum(c[22 + i] << (2 + 3 * i) for i in range(10))
    packed = pack_rows(np.array(c).reshape(32, 1), 3)
    assert packed.shape == (3, 1) and packed.dtype == np.int32
    assert u32(packed) == [w0, w1, w2]
    assert unpack_rows(packed, 3)[:, 0].tolist() == c


@pytest.mark.parametrize(("bits", "v1_word", "lsb_masks"), [
    (2, 0x55555555, [0x55555555]),
    (4, 0x77777777, [0x11111111]),
    (8, 0x7F7F7F7F, [0x01010101]),
    (3, None, [0x49249249, 0x92492492, 0x24924924]),  # §A.1.5's three 3-bit constants, word order
])
def test_sym_qzeros_words(bits: int, v1_word: int | None, lsb_masks: list[int]) -> None:
    out = 64
    w = torch.randn(out, 64, generator=torch.Generator().manual_seed(bits))
    qt = quantize_rtn(w, QuantConfig(method="rtn", bits=bits, group_size=32, sym=True))
    v1 = quantized_tensor_to_gptq(qt, fmt="gptq")["qzeros"].numpy()
    v2 = quantized_tensor_to_gptq(qt, fmt="gptq_v2")["qzeros"].numpy()
    assert v1.shape == (2, out * bits // 32)
    assert np.all(unpack_cols(v1, bits) == 2 ** (bits - 1) - 1)
    assert np.all(unpack_cols(v2, bits) == 2 ** (bits - 1))
    # GPTQModel's per-word v1<->v2 constants are the masks of each field's lowest bit
    ones = u32(pack_cols(np.ones((1, 32), np.uint8), bits))
    assert ones == lsb_masks * (len(ones) // len(lsb_masks))
    if v1_word is not None:  # no field straddles a word, so v2 = v1 + mask word by word
        assert np.all(v1.view(np.uint32) == v1_word)
        assert np.all(v2.view(np.uint32) - v1.view(np.uint32) == lsb_masks[0])
    if bits == 4:
        assert int(quantized_tensor_to_gptq(qt)["qzeros"][0, 0]) == 2004318071  # int32 0x77777777
        assert np.all(v2.view(np.uint32) == 0x88888888)


# ----------------------------------------------------------------- identities


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_identity(bits: int) -> None:
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=(96, 40), dtype=np.uint8)
    packed = pack_rows(codes, bits)
    assert packed.shape == (96 * bits // 32, 40) and packed.dtype == np.int32
    assert np.array_equal(unpack_rows(packed, bits), codes)
    zeros = rng.integers(0, 2**bits, size=(5, 96), dtype=np.uint8)
    qz = pack_cols(zeros, bits)
    assert qz.shape == (5, 96 * bits // 32) and qz.dtype == np.int32
    assert np.array_equal(unpack_cols(qz, bits), zeros)
    # agrees with the integer oracle column by column
    assert u32(packed[:, 7]) == oracle_pack_column(codes[:, 7].tolist(), bits)
    assert u32(qz[2]) == oracle_pack_column(zeros[2].tolist(), bits)


def _random_qt(bits: int, sym: bool, act_order: bool, seed: int) -> QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    out, inp, gs = 64, 128, 32
    maxq = 2**bits - 1
    zeros = (torch.full((out, inp // gs), 2 ** (bits - 1)) if sym
             else torch.randint(0, maxq + 1, (out, inp // gs), generator=g))
    zeros[0, 0] = 2 ** (bits - 1) if sym else 0  # asym: include the zero v1 cannot store
    g_idx = torch.arange(inp) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(inp, generator=g)]
    return QuantizedTensor(
        codes=torch.randint(0, maxq + 1, (out, inp), generator=g).to(torch.uint8),
        scales=(torch.rand(out, inp // gs, generator=g) + 0.01).half(),
        zeros=zeros.int(),
        g_idx=g_idx.int(),
        scheme=QuantScheme(bits, gs, sym),
        shape=(out, inp),
    )


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("fmt", "sym"), [("gptq", True), ("gptq_v2", True), ("gptq_v2", False)])
@pytest.mark.parametrize("act_order", [False, True])
def test_quantized_tensor_round_trip(bits: int, fmt: str, sym: bool, act_order: bool) -> None:
    qt = _random_qt(bits, sym, act_order, seed=bits)
    bias = torch.randn(64)
    t = quantized_tensor_to_gptq(qt, bias=bias, fmt=fmt)
    assert t["qweight"].shape == (128 * bits // 32, 64) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (4, 64 * bits // 32) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (4, 64) and t["scales"].dtype == torch.float16
    assert t["g_idx"].dtype == torch.int32 and t["bias"].dtype == torch.float16
    assert all(v.is_contiguous() for v in t.values())
    back = gptq_to_quantized_tensor(t, bits, 32, sym, desc_act=act_order, fmt=fmt)
    for name in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, name), getattr(qt, name)), name
    assert back.scheme == qt.scheme and back.shape == qt.shape
    assert torch.equal(back.dequantize(), qt.dequantize())


def test_v1_cannot_store_zero_point_zero() -> None:
    with pytest.raises(InfqError, match="gptq_v2"):
        quantized_tensor_to_gptq(_random_qt(4, False, False, seed=0), fmt="gptq")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
def test_checkpoint_dequant_equals_rtn_fake_quant(bits: int, group_size: int) -> None:
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    sym = bits != 3  # exercise asym (v2) too
    qt = quantize_rtn(w, QuantConfig(method="rtn", bits=bits, group_size=group_size, sym=sym))
    fmt = "gptq" if sym else "gptq_v2"
    back = gptq_to_quantized_tensor(quantized_tensor_to_gptq(qt, fmt=fmt), bits, group_size, sym,
                                    desc_act=False, fmt=fmt)
    gs = 128 if group_size == -1 else group_size
    s = qt.scales.float()[:, :, None]  # (out, G, 1)
    z = qt.zeros.float()[:, :, None]
    fq = fake_quantize(w.reshape(32, 128 // gs, gs), s, z, 2**bits - 1).reshape(32, 128)
    assert torch.equal(back.dequantize(), fq)


# ----------------------------------------------------------------- decoding an oracle-built checkpoint


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_decodes_checkpoint_built_by_integer_loops(bits: int, fmt: str) -> None:
    rng = np.random.default_rng(100 + bits)
    inp, out, gs, maxq = 64, 32, 16, 2**bits - 1
    n_groups = inp // gs
    codes = rng.integers(0, maxq + 1, size=(inp, out)).tolist()
    lo = 1 if fmt == "gptq" else 0  # v1 stores zero-1, so zero 0 is not representable there
    zeros = rng.integers(lo, maxq + 1, size=(n_groups, out)).tolist()
    scales = [[float(np.float16(s)) for s in row] for row in rng.uniform(0.01, 2, (n_groups, out))]
    g_idx = [(p // gs) for p in rng.permutation(inp)]  # act-order: non-monotone g_idx
    t = oracle_checkpoint(codes, zeros, scales, g_idx, bits, fmt)
    qt = gptq_to_quantized_tensor(t, bits, gs, sym=False, desc_act=True, fmt=fmt)
    expect = [[scales[g_idx[i]][o] * (codes[i][o] - zeros[g_idx[i]][o]) for i in range(inp)]
              for o in range(out)]
    assert qt.dequantize().tolist() == expect
    assert u32(quantized_tensor_to_gptq(qt, fmt=fmt)["qweight"].numpy()) == u32(t["qweight"].numpy())


def test_sym_zero_detection_and_act_order_handling() -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    qt = quantize_rtn(w, QuantConfig(method="rtn", bits=4, group_size=32))
    v2 = quantized_tensor_to_gptq(qt, fmt="gptq_v2")
    mislabeled = gptq_to_quantized_tensor(v2, 4, 32, sym=True, desc_act=False, fmt="gptq")
    assert torch.equal(mislabeled.dequantize(), qt.dequantize())  # v2 zeros under "gptq": detected
    literal = gptq_to_quantized_tensor(v2, 4, 32, sym=True, desc_act=False, fmt="gptq",
                                       detect_sym_zeros=False)
    assert torch.all(literal.zeros == 9)
    shuffled = dict(v2, g_idx=v2["g_idx"].flip(0))
    ignored = gptq_to_quantized_tensor(shuffled, 4, 32, True, desc_act=False, fmt="gptq_v2")
    assert torch.equal(ignored.g_idx, qt.g_idx)  # without desc_act g_idx is arange//gs (as vLLM)


def test_shape_errors_name_the_dim() -> None:
    with pytest.raises(InfqError, match="input dim 48 is not a multiple of 32"):
        pack_rows(np.zeros((48, 8), np.uint8), 3)
    qt = quantize_rtn(torch.randn(12, 64), QuantConfig(method="rtn", bits=4, group_size=32))
    with pytest.raises(InfqError, match="output dim 12 is not a multiple of 8"):
        quantized_tensor_to_gptq(qt)
    t = quantized_tensor_to_gptq(quantize_rtn(torch.randn(16, 64), QuantConfig(method="rtn", group_size=32)))
    with pytest.raises(InfqError, match="check group_size"):
        gptq_to_quantized_tensor(dict(t, scales=t["scales"][:1]), 4, 32, True, False)
    with pytest.raises(InfqError, match="group_size 48 does not divide the input dim 64"):
        gptq_to_quantized_tensor(t, 4, 48, True, False)
    with pytest.raises(InfqError, match="use 2, 3, 4 or 8"):
        pack_rows(np.zeros((32, 1), np.uint8), 5)


# ----------------------------------------------------------------- configs


def test_quantization_config_contents_and_round_trip() -> None:
    c = QuantConfig(method="gptq", bits=4, group_size=128, desc_act=True, skip=(r".*mlp\.gate",))
    d = gptq_quantization_config(c)
    minimal = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True,
               "checkpoint_format": "gptq", "lm_head": False}
    assert minimal.items() <= d.items()
    assert (d["damp_percent"], d["true_sequential"], d["static_groups"]) == (0.01, True, False)
    assert d["dynamic"] == {r"-:.*mlp\.gate": {}}
    assert json.loads(json.dumps(d)) == d == gptq_quantize_config_json(c)
    assert parse_gptq_config(d) == (c, "gptq")
    asym = QuantConfig(method="rtn", bits=8, group_size=-1, sym=False, nsamples=16, seqlen=512)
    d2 = gptq_quantization_config(asym)
    assert d2["checkpoint_format"] == "gptq_v2"  # asym defaults to v2 (v1 cannot store zero 0)
    assert parse_gptq_config(d2) == (asym, "gptq_v2")
    with pytest.raises(InfqError, match="use method gptq, rtn or awq"):
        gptq_quantization_config(QuantConfig(method="fp8", bits=8, group_size=-1))


def test_parse_ecosystem_variants() -> None:
    autogptq = {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False,
                "static_groups": False, "sym": True, "true_sequential": True,
                "model_name_or_path": None, "model_file_base_name": "model", "quant_method": "gptq",
                "checkpoint_format": "gptq"}
    c, fmt = parse_gptq_config(autogptq)
    assert (c.bits, c.group_size, c.sym, fmt) == (4, 128, True, "gptq")
    gptqmodel = {"w_bit": 3, "q_group_size": 64, "desc_act": True, "sym": False, "lm_head": False,
                 "quant_method": "gptq", "checkpoint_format": "gptq_v2", "pack_dtype": "int32",
                 "dynamic": {r"-:model\.layers\.0\..*": {}},
                 "meta": {"quantizer": ["gptqmodel:1.9.0"], "damp_percent": 0.05,
                          "static_groups": True, "true_sequential": False}}
    c, fmt = parse_gptq_config(gptqmodel)
    assert (c.bits, c.group_size, c.desc_act, c.sym, fmt) == (3, 64, True, False, "gptq_v2")
    assert (c.damp_percent, c.static_groups, c.true_sequential) == (0.05, True, False)
    assert c.skip == (r"model\.layers\.0\..*",)
    transformers = {"quant_method": "gptq", "bits": 8, "group_size": -1, "damp_percent": 0.1,
                    "desc_act": False, "sym": True, "tokenizer": None, "dataset": None,
                    "use_exllama": True, "modules_in_block_to_quantize": None}
    c, fmt = parse_gptq_config(transformers)
    assert (c.bits, c.group_size, c.damp_percent, fmt) == (8, -1, 0.1, "gptq")


@pytest.mark.parametrize(("change", "fix"), [
    ({"quant_method": "awq"}, "open this checkpoint with its own reader"),
    ({"checkpoint_format": "marlin"}, "infq reads 'gptq' and 'gptq_v2'"),
    ({"is_marlin_format": True}, "use the original gptq checkpoint"),
    ({"pack_dtype": "int16"}, "re-save with pack_dtype int32"),
    ({"dynamic": {r"+:.*down_proj": {"bits": 8}}}, "requantize with one setting"),
    ({"modules_in_block_to_quantize": [["self_attn.q_proj"]]}, "not supported"),
    ({"bits": 5}, "use 2, 3, 4 or 8"),
    ({"bits": None}, "lacks 'bits'"),
])
def test_parse_rejects_unsupported(change: dict, fix: str) -> None:
    d = gptq_quantization_config(QuantConfig()) | change
    with pytest.raises(InfqError) as e:
        parse_gptq_config(d)
    assert fix in str(e.value)


# ----------------------------------------------------------------- shards


def _tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(f"model.layers.{i}.w", torch.randn(16, 16, generator=g).to(dt))  # 1 KiB or 512 B each
            for i, dt in enumerate([torch.float32, torch.float16, torch.float32, torch.int32,
                                    torch.float16, torch.bfloat16, torch.float32])]


def test_write_shards_index_and_read_back(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (tmp_path / "sibling.txt").write_text("x")
    tensors = _tensors()
    seen: list[list[str]] = []

    def stream():  # records which files exist when each tensor is requested
        for item in tensors:
            seen.append(sorted(p.name for p in out.iterdir()))
            yield item

    weight_map = write_gptq_shards(out, stream(), max_shard_bytes=2048)
    assert seen[0] == [] and seen[-1]  # shards were flushed before the stream ended
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map and set(weight_map) == {n for n, _ in tensors}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for _, t in tensors)
    files = sorted(set(weight_map.values()))
    n = len(files)
    assert n >= 3 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted(files + ["model.safetensors.index.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "sibling.txt"]  # wrote only in out
    for name, t in tensors:
        with safe_open(str(out / weight_map[name]), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and torch.equal(got, t)
    for file in files:  # no shard over the limit unless one tensor alone is larger
        with safe_open(str(out / file), framework="pt") as f:
            assert sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()) <= 2048


def test_write_single_shard_and_errors(tmp_path: Path) -> None:
    weight_map = write_gptq_shards(tmp_path, iter(_tensors()), metadata={"gptq_bits": "4"})
    assert set(weight_map.values()) == {"model.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "gptq_bits": "4"}
    with pytest.raises(InfqError, match="empty directory"):
        write_gptq_shards(tmp_path, iter(_tensors()))
    with pytest.raises(InfqError, match="create it first"):
        write_gptq_shards(tmp_path / "missing", iter(_tensors()))

    def failing():
        yield from _tensors()[:3]
        raise RuntimeError("calibration crashed")

    empty = tmp_path / "e"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="crashed"):
        write_gptq_shards(empty, failing(), max_shard_bytes=1024)
    assert list(empty.iterdir()) == []  # no half-written checkpoint left behind


def test_stored_tensors_are_copied_through_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass-through tensors (embeddings, lm_head) go from the source file to the shard in chunks,
    never read whole; the safetensors library reads them back equal to the source."""
    from safetensors.torch import save_file

    from infq.formats.hf import Checkpoint
    from infq.formats.safetensors_io import StoredTensor

    src = tmp_path / "src"
    src.mkdir()
    tensors = dict(_tensors())
    save_file(tensors, str(src / "model.safetensors"))
    monkeypatch.setattr(StoredTensor, "CHUNK", 100)  # 1 KiB tensors: several chunks each, one partial
    reads: list[int] = []
    real = StoredTensor.chunks

    def counting(self):
        for c in real(self):
            reads.append(len(c))
            yield c

    monkeypatch.setattr(StoredTensor, "chunks", counting)
    ckpt = Checkpoint(src, mmap=False)
    out = tmp_path / "out"
    out.mkdir()
    stream = [(n, ckpt.stored(n)) for n in ckpt.keys()]
    assert all(isinstance(t, StoredTensor) for _, t in stream)
    write_gptq_shards(out, iter(stream), max_shard_bytes=2048)
    assert max(reads) == 100 and sum(reads) == sum(t.numel() * t.element_size() for t in tensors.values())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for name, t in tensors.items():
        with safe_open(str(out / index["weight_map"][name]), framework="pt") as f:
            got = f.get_tensor(name)
        assert got.dtype == t.dtype and torch.equal(got, t)
    (src / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:-10])  # truncated source
    with pytest.raises(InfqError, match="truncated"):
        Checkpoint(src, mmap=False)
