"""GGUF files in the runtime: logits against transformers on the same (decoded) weights.

Oracles: transformers' LlamaForCausalLM forward (float32) on weights decoded by gguf-py's own
`gguf.quants.dequantize` (llama.cpp-style file, built here with gguf-py's writer and quantizer from
the spec: permuted Q/K, llama metadata) or by `formats.gguf.read_gguf` (infq's file, K-quants; its
decoders are bit-identical to gguf-py's, see test_kquants). Tolerance: 1e-4 absolute on logits of
magnitude ~1-10, float32 on both sides (the two implementations differ only in summation order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tinymodels import make_tiny_model

from infq.errors import InfqError
from infq.formats.gguf import read_gguf, write_gguf
from infq.formats.hf import Checkpoint
from infq.runtime.loader import load_model

ATOL = 1e-4
HF_TO_GGUF = {  # reference §A.4.3, written out here independently of formats.gguf
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
LLAMACPP_TYPES = {"attn_q": "Q8_0", "attn_k": "Q4_0", "attn_v": "Q5_0", "attn_output": "Q4_1",
                  "ffn_gate": "Q5_1", "ffn_up": "Q8_0", "ffn_down": "Q4_0", "output": "Q8_0", "token_embd": "F16"}


def _gguf_of(hf: str) -> str:
    if hf in HF_TO_GGUF:
        return HF_TO_GGUF[hf]
    parts = hf.split(".")
    return f"blk.{parts[2]}.{HF_TO_GGUF['.'.join(parts[3:])]}"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (§A.4.3)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _logits(model_dir: Path, weights: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, strict=False)
    with torch.no_grad():
        return model(ids).logits  # (1, T, V)


def write_llamacpp_style(path: Path, model_dir: Path) -> dict[str, torch.Tensor]:
    """A GGUF as llama.cpp's converter + llama-quantize lay it out, through gguf-py only; returns the
    HF-named float32 weights it decodes to (gguf-py's dequantize, permutation undone)."""
    import gguf

    cfg = Checkpoint(model_dir)
    import json

    hc = json.loads((model_dir / "config.json").read_text())
    heads, kv = hc["num_attention_heads"], hc["num_key_value_heads"]
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(hc["max_position_embeddings"])
    w.add_embedding_length(hc["hidden_size"])
    w.add_block_count(hc["num_hidden_layers"])
    w.add_feed_forward_length(hc["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(hc["rms_norm_eps"])
    w.add_rope_dimension_count(hc["hidden_size"] // heads)
    w.add_file_type(7)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
                     + [f"t{i}" for i in range(hc["vocab_size"] - 259)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (hc["vocab_size"] - 259))
    w.add_token_scores([0.0] * hc["vocab_size"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    decoded = {}
    for hf in cfg.keys():
        name = _gguf_of(hf)
        x = cfg.get(hf).to(torch.float32).numpy()
        n_head = heads if "q_proj" in hf else kv if "k_proj" in hf else None
        if n_head is not None:
            x = _permute(x, n_head)
        kind = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
        qtype = LLAMACPP_TYPES.get(kind, "F32") if x.ndim == 2 else "F32"
        if qtype == "F32":
            data, back = x, x
        elif qtype == "F16":
            data = x.astype(np.float16)
            back = data.astype(np.float32)
        else:
            t = gguf.GGMLQuantizationType[qtype]
            data = gguf.quants.quantize(x, t)
            back = gguf.quants.dequantize(data, t)
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[qtype])
        if n_head is not None:
            back = _unpermute(back, n_head)
        decoded[hf] = torch.from_numpy(np.ascontiguousarray(back))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return decoded


def test_llamacpp_style_gguf_matches_transformers(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "m")
    decoded = write_llamacpp_style(tmp_path / "m.gguf", model_dir)
    loaded = load_model(str(tmp_path / "m.gguf"))
    assert loaded.format == "gguf" and loaded.config.num_kv_heads == 2 and not loaded.config.tie_word_embeddings
    ids = torch.randint(3, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = 1
    want = _logits(model_dir, decoded, ids)
    got = loaded.model(ids)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # no merges in this vocab: " ab" -> "▁ab" -> byte tokens of e2 96 81 61 62 after BOS
    assert loaded.tokenizer.encode("ab") == [1] + [3 + b for b in "\u2581ab".encode()]


def test_infq_kquant_gguf_matches_transformers_on_decoded_weights(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "m", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                num_key_value_heads=2)
    ckpt = Checkpoint(model_dir)
    tensors = {k: ckpt.get(k) for k in ckpt.keys()}
    types = {k: t for k, t in zip(sorted(k for k in tensors if tensors[k].dim() == 2),
                                  ["Q6_K", "Q4_K", "Q5_K", "Q3_K", "Q2_K", "Q8_0", "Q4_K", "Q6_K", "Q5_K",
                                   "Q4_0", "Q4_K", "Q3_K", "Q6_K", "Q5_1", "Q4_1", "Q8_0", "Q4_K"], strict=False)}
    import json

    cfg = json.loads((model_dir / "config.json").read_text())
    write_gguf(tmp_path / "q.gguf", cfg, tensors, types)
    decoded = read_gguf(tmp_path / "q.gguf").tensors
    loaded = load_model(str(tmp_path / "q.gguf"), tokenizer=False)
    ids = torch.randint(3, 320, (1, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded.model(ids), _logits(model_dir, decoded, ids), atol=ATOL, rtol=0)
    q = loaded.model.blocks[0].linears["q"]
    assert q.shape == (256, 256)  # a QuantLinear over the blocks, not a dense copy of the file
    torch.testing.assert_close(q.weight, decoded["model.layers.0.self_attn.q_proj.weight"], atol=0, rtol=0)


def test_tied_embeddings_when_output_is_absent(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "m", tie_word_embeddings=True)
    ckpt = Checkpoint(model_dir)
    tensors = {k: ckpt.get(k) for k in ckpt.keys() if k != "lm_head.weight"}
    import json

    write_gguf(tmp_path / "t.gguf", json.loads((model_dir / "config.json").read_text()), tensors, "F32")
    loaded = load_model(str(tmp_path / "t.gguf"), tokenizer=False)
    assert loaded.config.tie_word_embeddings
    ids = torch.tensor([[1, 5, 9, 77]])
    torch.testing.assert_close(loaded.model(ids), _logits(model_dir, tensors, ids), atol=ATOL, rtol=0)


def test_missing_tensor_and_no_tokenizer_are_one_line_errors(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "m")
    ckpt = Checkpoint(model_dir)
    tensors = {k: ckpt.get(k) for k in ckpt.keys() if "layers.1.mlp.up_proj" not in k}
    import json

    write_gguf(tmp_path / "x.gguf", json.loads((model_dir / "config.json").read_text()), tensors, "F16")
    with pytest.raises(InfqError, match="up_proj.weight .*missing") as e:
        load_model(str(tmp_path / "x.gguf"))
    assert "\n" not in str(e.value)
    full = {k: ckpt.get(k) for k in ckpt.keys()}
    write_gguf(tmp_path / "y.gguf", json.loads((model_dir / "config.json").read_text()), full, "F16")
    with pytest.raises(InfqError, match="holds no tokenizer"):
        load_model(str(tmp_path / "y.gguf"))
