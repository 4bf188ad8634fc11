"""GGUF files for llama-architecture models (reference §A.4), container I/O through the `gguf` package.

`write_gguf` maps HF tensor names to llama.cpp's (§A.4.3), applies the Q/K row permutation
llama.cpp's converter applies (HF rotate-half -> adjacent-pair RoPE) *before* quantizing, encodes
each tensor with `quantizers.kquants` (norms and 1-D tensors stay F32), and writes llama metadata
(§A.4.2) and tokenizer metadata handed in as a mapping. It writes to `path.tmp` and renames when
complete. `read_gguf` checks the header against the file size before `gguf.GGUFReader` touches it
(no allocation proportional to a corrupt count), refuses non-llama files, and returns the HF-style
config, the decoded float32 tensors under HF names (permutation undone), each tensor's GGML type
and the raw metadata. `write_gguf_stream` writes pre-encoded tensors (kind "gguf:<TYPE>"
QuantizedTensors from `quantizers.kquants.quantize_kquant`) one at a time, with extra metadata
(llama.cpp's `quantize.imatrix.*` keys). Limits: llama only (Mistral is written as llama, as
llama.cpp's converter does; its sliding window is not recorded, so contexts beyond it differ);
tokenizer metadata is built by `gguf_vocab`; MoE, biases other than q/k/v/o and rope scaling are
not written.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infq.errors import InfqError
from infq.quantizers import kquants

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_BLOCK_NAMES = (  # HF suffix inside a layer -> GGUF suffix inside blk.N
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
)
_TOP_NAMES = (("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"),
              ("lm_head.weight", "output.weight"))
_FLOAT_TYPES = ("F32", "F16")
_MIN_TENSOR_INFO = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
_MIN_KV = 8 + 4 + 1  # key length, value type, a 1-byte value


def gguf_name(hf_name: str) -> str:
    """HF llama tensor name -> GGUF name; InfqError for a tensor llama.cpp's llama arch has no name for."""
    for hf, gg in _TOP_NAMES:
        if hf_name == hf:
            return gg
    m = _LAYER.fullmatch(hf_name)
    if m:
        for hf, gg in _BLOCK_NAMES:
            if m.group(2) == hf:
                return f"blk.{m.group(1)}.{gg}"
    raise InfqError(f"tensor {hf_name!r} has no GGUF llama name; drop it or convert another architecture")


def hf_name(gguf_tensor: str) -> str:
    for hf, gg in _TOP_NAMES:
        if gguf_tensor == gg:
            return hf
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_tensor)
    if m:
        for hf, gg in _BLOCK_NAMES:
            if m.group(2) == gg:
                return f"model.layers.{m.group(1)}.{hf}"
    raise InfqError(f"GGUF tensor {gguf_tensor!r} is not part of a llama model; the file is not llama")


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp adjacent pairs: per head, new row 2i = old i, 2i+1 = old i + d/2."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads_for(hf: str, cfg: Mapping[str, Any]) -> int | None:
    if "q_proj" in hf:
        return int(cfg["num_attention_heads"])
    if "k_proj" in hf:
        return int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    return None


def _check_llama(cfg: Mapping[str, Any]) -> None:
    arch = cfg.get("model_type")
    if arch not in ("llama", "mistral"):  # llama.cpp's converter writes Mistral as llama too
        raise InfqError(f"GGUF export supports the llama architecture (llama, mistral), not {arch!r}; "
                        "convert a llama model")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "rms_norm_eps", "max_position_embeddings", "vocab_size"):
        if key not in cfg:
            raise InfqError(f"config.json lacks {key!r}, which GGUF llama metadata needs; add it")


def _add_metadata(w: Any, cfg: Mapping[str, Any], file_type: int | None) -> None:
    import gguf

    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    w.add_type("model")
    w.add_name(str(cfg.get("_name_or_path") or "infq model"))
    w.add_vocab_size(int(cfg["vocab_size"]))
    w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or heads))
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if file_type is not None:
        w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(w: Any, tok: Mapping[str, Any]) -> None:
    """tok: model ('llama' | 'gpt2'), tokens, and optionally scores, token_type, merges, pre,
    bos/eos/unk/pad token ids, add_bos/add_eos/add_space_prefix, chat_template (see gguf_vocab)."""
    if tok.get("model") not in ("llama", "gpt2") or not tok.get("tokens"):
        raise InfqError("tokenizer metadata needs model 'llama' (SentencePiece) or 'gpt2' (BPE) and tokens")
    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre(tok.get("pre", "default"))
    w.add_token_list(list(tok["tokens"]))
    if tok.get("scores") is not None:
        w.add_token_scores([float(s) for s in tok["scores"]])
    if tok.get("token_type") is not None:
        w.add_token_types([int(t) for t in tok["token_type"]])
    if tok.get("merges"):
        w.add_token_merges(list(tok["merges"]))
    elif tok["model"] == "gpt2":
        raise InfqError("a gpt2 (BPE) tokenizer needs its merges; pass them from tokenizer.json")
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        if tok.get(key) is not None:
            add(int(tok[key]))
    for key, add in (("add_bos", w.add_add_bos_token), ("add_eos", w.add_add_eos_token),
                     ("add_space_prefix", w.add_add_space_prefix)):
        if tok.get(key) is not None:
            add(bool(tok[key]))
    if tok.get("chat_template"):
        w.add_chat_template(str(tok["chat_template"]))


def _encode(hf: str, t: torch.Tensor, qtype: str, imatrix: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, Any]:
    import gguf

    if t.dim() == 1 or hf.endswith("norm.weight") or qtype == "F32":
        return t.to(torch.float32).numpy(), gguf.GGMLQuantizationType.F32
    if qtype == "F16":
        return t.to(torch.float16).numpy(), gguf.GGMLQuantizationType.F16
    data = kquants.quantize(t, qtype, imatrix.get(hf))
    return data, gguf.GGMLQuantizationType[kquants.block_type(qtype).name]


def _open_writer(path: Path, config: Mapping[str, Any], tokenizer: Mapping[str, Any] | None,
                 file_type: int | None) -> tuple[Any, Path]:
    """A GGUFWriter on `path.tmp` holding the llama metadata and the tokenizer, and that temp path."""
    import gguf

    _check_llama(config)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    _add_metadata(w, config, file_type)
    if tokenizer is not None:
        _add_tokenizer(w, tokenizer)
    return w, tmp


def write_gguf(path: str | os.PathLike[str], config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
               types: Mapping[str, str] | str = "F16", tokenizer: Mapping[str, Any] | None = None,
               imatrix: Mapping[str, torch.Tensor] | None = None, file_type: int | None = None) -> None:
    """Write a llama GGUF: tensors under HF names, `types` one GGML type name or one per HF name."""
    path = Path(path)
    w, tmp = _open_writer(path, config, tokenizer, file_type)
    for hf, t in tensors.items():
        name = gguf_name(hf)
        t = torch.as_tensor(t).detach().cpu()
        heads = _heads_for(hf, config)
        if heads is not None:
            t = permute_qk(t, heads)
        qtype = types if isinstance(types, str) else types.get(hf, "F16")
        data, dtype = _encode(hf, t, qtype.upper(), imatrix or {})
        w.add_tensor(name, data, raw_dtype=dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)


def _add_kv(w: Any, key: str, value: Any) -> None:
    """One extra metadata value: str -> string, bool -> bool, int -> i32 (llama.cpp's quantize.* keys)."""
    if isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_int32(key, value)
    else:
        raise InfqError(f"metadata {key}: {type(value).__name__} values are not written; pass str, bool or int")


def _stream_info(w: Any, name: str, shape: tuple[int, ...], qtype: str) -> None:
    import gguf

    n = int(np.prod(shape))
    if qtype in _FLOAT_TYPES:
        dtype = np.dtype(np.float32 if qtype == "F32" else np.float16)
        w.add_tensor_info(name, shape, dtype, n * dtype.itemsize)
        return
    t = kquants.block_type(qtype)
    row_bytes = shape[-1] // t.block * t.nbytes
    w.add_tensor_info(name, (*shape[:-1], row_bytes), np.dtype(np.uint8), n // shape[-1] * row_bytes,
                      raw_dtype=gguf.GGMLQuantizationType[t.name])


def _stream_data(hf: str, value: Any, qtype: str, config: Mapping[str, Any]) -> np.ndarray:
    """The bytes of one tensor as the file stores them: Q/K rows permuted, the planned type."""
    from infq.quantizers.scheme import QuantizedTensor

    heads = _heads_for(hf, config)
    if isinstance(value, QuantizedTensor):
        if value.scheme.ggml_type != qtype:
            raise InfqError(f"{hf} was encoded as {value.scheme.kind}, not the planned {qtype}")
        data = value.codes.cpu()  # (out, row_bytes): rows are independent, so permuting bytes is exact
    elif qtype in _FLOAT_TYPES:
        data = torch.as_tensor(value).detach().cpu().to(torch.float32 if qtype == "F32" else torch.float16)
    else:
        raise InfqError(f"{hf} must be handed over encoded as {qtype}, got a float tensor")
    if heads is not None:
        data = permute_qk(data, heads)
    return np.ascontiguousarray(data.numpy())


def write_gguf_stream(path: str | os.PathLike[str], config: Mapping[str, Any],
                      entries: list[tuple[str, tuple[int, ...], str]], produce: Any,
                      tokenizer: Mapping[str, Any] | None = None, file_type: int | None = None,
                      extra: Mapping[str, Any] | None = None) -> None:
    """Write a llama GGUF one tensor at a time: `entries` (HF name, torch shape, GGML type) fix the
    header, then `produce(hf_name)` returns each tensor in turn (a float tensor for F32/F16, a
    "gguf:<type>" QuantizedTensor otherwise), so only one tensor is in memory while writing.
    Written to `path.tmp`, renamed when complete; the partial file is removed on failure."""
    path = Path(path)
    w, tmp = _open_writer(path, config, tokenizer, file_type)
    for key, value in (extra or {}).items():
        _add_kv(w, key, value)
    for hf, shape, qtype in entries:
        _stream_info(w, gguf_name(hf), tuple(int(d) for d in shape), qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for hf, _, qtype in entries:
            w.write_tensor_data(_stream_data(hf, produce(hf), qtype, config))
        w.close()
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


@dataclass(frozen=True)
class GGUFModel:
    """What `read_gguf` returns: HF-style config, float32 tensors under HF names, their GGML types."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    types: dict[str, str]
    metadata: dict[str, Any]


def _check_header(path: Path) -> None:
    """Magic, version and counts against the file size, before any parser allocates per count."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise InfqError(f"{path} is not a GGUF file (bad magic or truncated header); re-export it")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise InfqError(f"{path} has GGUF version {version}; only versions 2 and 3 are readable, re-export it")
    if n_tensors * _MIN_TENSOR_INFO + n_kv * _MIN_KV > size - 24:
        raise InfqError(f"{path} claims {n_tensors} tensors and {n_kv} metadata keys, more than its "
                        f"{size} bytes can hold; the file is corrupt or truncated, re-export it")


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def read_gguf(path: str | os.PathLike[str]) -> GGUFModel:
    """Read a llama GGUF into HF-named float32 tensors and an HF-style config."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise InfqError(f"{path} does not exist or is not a file; pass a .gguf file")
    _check_header(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, struct.error, OverflowError) as exc:
        raise InfqError(f"{path} is not a readable GGUF file ({exc}); re-export it") from exc
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise InfqError(f"{path} holds architecture {arch!r}; infq reads llama GGUF files only")
    meta = {k: _field(reader, k) for k in reader.fields if not k.startswith("GGUF.")}
    heads = int(meta["llama.attention.head_count"])
    config = {
        "model_type": "llama",
        "hidden_size": meta["llama.embedding_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", heads),
        "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
        "max_position_embeddings": meta["llama.context_length"],
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0),
        "vocab_size": meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []),
    }
    tensors, types = {}, {}
    for t in reader.tensors:
        hf = hf_name(t.name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml ne -> torch order
        qname = t.tensor_type.name
        if qname in _FLOAT_TYPES:
            value = torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(shape)
        else:
            rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            value = kquants.dequantize(np.asarray(t.data).reshape(rows, -1), qname, shape[-1]).reshape(shape)
        n_head = _heads_for(hf, config)
        tensors[hf] = unpermute_qk(value, n_head) if n_head is not None else value
        types[hf] = qname
    return GGUFModel(config=config, tensors=tensors, types=types, metadata=meta)
