"""GGUF writer/reader (reference §A.4): round trip, Q/K permutation, bad files.

Oracles: tensors read back equal exactly what was written (F32 as is, F16 = the fp16 rounding,
block types = our encoder's bytes decoded, which test_kquants checks against gguf-py); the file is
also parsed by gguf-py's own GGUFReader for names, ggml shapes and types; the permutation is checked
against the index rule of §A.4.3 written out by hand.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from infq.errors import InfqError
from infq.formats.gguf import permute_qk, read_gguf, unpermute_qk, write_gguf
from infq.quantizers import kquants

CFG = dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=1,
           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128,
           vocab_size=8, rope_theta=10000.0)
TYPES = {"model.layers.0.self_attn.q_proj.weight": "Q4_K", "model.layers.0.self_attn.k_proj.weight": "Q6_K",
         "model.layers.0.self_attn.v_proj.weight": "Q8_0", "model.layers.0.self_attn.o_proj.weight": "Q3_K",
         "model.layers.0.mlp.gate_proj.weight": "Q2_K", "model.layers.0.mlp.up_proj.weight": "Q5_K",
         "model.layers.0.mlp.down_proj.weight": "Q4_0", "model.embed_tokens.weight": "F16",
         "lm_head.weight": "F32"}
TOKENIZER = dict(model="gpt2", tokens=["<s>", "</s>", "a", "b", "ab", "c", "bc", "abc"], token_type=[3, 3] + [1] * 6,
                 merges=["a b", "b c", "ab c"], bos_token_id=0, eos_token_id=1, pre="default", add_bos=True)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, ff, kv = 256, 512, 2 * 64
    shapes = {"model.embed_tokens.weight": (8, h), "model.norm.weight": (h,), "lm_head.weight": (8, h),
              "model.layers.0.input_layernorm.weight": (h,), "model.layers.0.post_attention_layernorm.weight": (h,),
              "model.layers.0.self_attn.q_proj.weight": (h, h), "model.layers.0.self_attn.k_proj.weight": (kv, h),
              "model.layers.0.self_attn.v_proj.weight": (kv, h), "model.layers.0.self_attn.o_proj.weight": (h, h),
              "model.layers.0.mlp.gate_proj.weight": (ff, h), "model.layers.0.mlp.up_proj.weight": (ff, h),
              "model.layers.0.mlp.down_proj.weight": (h, ff)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_permutation_follows_the_index_rule() -> None:
    n_head, d = 3, 8
    w = torch.arange(n_head * d * 2, dtype=torch.float32).reshape(n_head * d, 2)
    p = permute_qk(w, n_head)
    for h in range(n_head):
        for i in range(d // 2):
            assert torch.equal(p[h * d + 2 * i], w[h * d + i])
            assert torch.equal(p[h * d + 2 * i + 1], w[h * d + i + d // 2])
    assert torch.equal(unpermute_qk(p, n_head), w)


def test_round_trip(tmp_path: Path) -> None:
    import gguf

    tensors = _tensors()
    path = tmp_path / "m.gguf"
    write_gguf(path, CFG, tensors, TYPES, tokenizer=TOKENIZER, file_type=15)
    m = read_gguf(path)
    for k, v in CFG.items():
        assert m.config[k] == pytest.approx(v), k
    assert m.metadata["tokenizer.ggml.tokens"] == TOKENIZER["tokens"]
    assert m.metadata["tokenizer.ggml.merges"] == TOKENIZER["merges"]
    assert m.metadata["general.file_type"] == 15 and m.metadata["general.quantization_version"] == 2
    assert set(m.tensors) == set(tensors)
    heads = {"q_proj": 4, "k_proj": 2}
    for name, w in tensors.items():
        qtype = "F32" if w.dim() == 1 else TYPES[name]
        n_head = next((v for k, v in heads.items() if k in name), None)
        if qtype == "F32":
            expect = w
        elif qtype == "F16":
            expect = w.half().float()
        else:
            pw = permute_qk(w, n_head) if n_head else w
            dec = kquants.dequantize(kquants.quantize(pw, qtype), qtype, pw.shape[1])
            expect = unpermute_qk(dec, n_head) if n_head else dec
        assert m.types[name] == qtype
        assert torch.equal(m.tensors[name], expect), name
    reader = gguf.GGUFReader(path)  # gguf-py's own parser: names, ggml order shapes
    info = {t.name: (t.tensor_type.name, t.shape.tolist()) for t in reader.tensors}
    assert info["blk.0.attn_q.weight"] == ("Q4_K", [256, 256])
    assert info["blk.0.ffn_down.weight"] == ("Q4_0", [512, 256])
    assert info["output_norm.weight"] == ("F32", [256])
    assert reader.fields["general.architecture"].contents() == "llama"


def _write(tmp_path: Path) -> Path:
    path = tmp_path / "m.gguf"
    t = _tensors()
    write_gguf(path, CFG, {k: t[k] for k in ("model.embed_tokens.weight", "model.norm.weight")}, "F16")
    return path


def _one_line_error(path: Path, match: str) -> None:
    with pytest.raises(InfqError, match=match) as info:
        read_gguf(path)
    assert "\n" not in str(info.value)


def test_unsupported_architecture(tmp_path: Path) -> None:
    with pytest.raises(InfqError, match="llama"):
        write_gguf(tmp_path / "x.gguf", {**CFG, "model_type": "gpt_neox"}, _tensors())
    import gguf

    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((2, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _one_line_error(path, "architecture 'gpt2'")


def test_truncated_file(tmp_path: Path) -> None:
    path = _write(tmp_path)
    data = path.read_bytes()
    for cut in (10, 40, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(InfqError) as info:
            read_gguf(bad)
        assert "\n" not in str(info.value)


def test_corrupt_header(tmp_path: Path) -> None:
    path = _write(tmp_path)
    data = bytearray(path.read_bytes())
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGUX" + data[4:])
    _one_line_error(bad, "not a GGUF file")
    bad = tmp_path / "version.gguf"
    bad.write_bytes(data[:4] + struct.pack("<I", 99) + data[8:])
    _one_line_error(bad, "version 99")


def test_absurd_tensor_count(tmp_path: Path) -> None:
    path = _write(tmp_path)
    data = bytearray(path.read_bytes())
    bad = tmp_path / "count.gguf"
    bad.write_bytes(data[:8] + struct.pack("<Q", 2**62) + data[16:])
    _one_line_error(bad, "more than its")
    bad.write_bytes(data[:16] + struct.pack("<Q", 2**40) + data[24:])
    _one_line_error(bad, "more than its")
