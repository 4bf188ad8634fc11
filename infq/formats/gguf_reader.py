"""Lazy reading of llama GGUF files for the runtime (reference §A.4): written by infq or by llama.cpp.

`GGUFFile` checks the header against the file size before `gguf.GGUFReader` parses anything
(`formats.gguf._check_header`), refuses architectures other than llama and files whose tensor
data runs past the end, and memory-maps the tensors. It exposes an HF-style config built from the
llama metadata (§A.4.2; `output.weight` absent means tied embeddings), the tensors under HF names
with their GGML types and torch shapes, `dense(name)` (float32, decoded with the kquants decoders
for block types) and `blocks(name)` (the raw GGML block bytes, `(out, row_bytes)` uint8, no copy
except for q/k). Q/K rows are permuted back from llama.cpp's adjacent-pair RoPE order to HF's
rotate-half order: a row of a block-quantized matrix is a whole unit, so the blocks are reordered
by rows and never decoded. `rope_freqs.weight` (Llama-3.1 rope scaling) is refused for now.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infq.errors import InfqError
from infq.formats.gguf import _check_header, hf_name, unpermute_qk
from infq.quantizers import kquants

FLOAT_TYPES = ("F32", "F16", "BF16")
_REQUIRED = ("llama.embedding_length", "llama.block_count", "llama.attention.head_count",
             "llama.attention.layer_norm_rms_epsilon")


def _view(a: np.ndarray) -> torch.Tensor:
    """A torch view of a read-only memory map (never written: the warning about it is noise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _int(meta: dict[str, Any], key: str, path: Path, default: int | None = None) -> int:
    v = meta.get(key, default)
    if isinstance(v, list):  # per-layer arrays: infq's decoder needs one value for every layer
        if not v or any(x != v[0] for x in v):
            raise InfqError(f"{path}: {key} differs between layers; infq's decoder needs one value")
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) <= 0:
        raise InfqError(f"{path}: metadata {key} is missing or not a positive integer ({v!r}); the file is corrupt")
    return int(v)


class GGUFFile:
    """One llama GGUF file, memory-mapped: metadata, HF config, tensors by HF name."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import gguf

        self.path = path = Path(path)
        if not path.is_file():
            raise InfqError(f"{path} does not exist or is not a file; pass a .gguf file")
        _check_header(path)
        try:
            self.reader = reader = gguf.GGUFReader(path)
        except (ValueError, IndexError, KeyError, struct.error, OverflowError, UnicodeDecodeError) as exc:
            raise InfqError(f"{path} is not a readable GGUF file ({str(exc)[:160]}); re-export it") from None
        self.meta: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if not key.startswith("GGUF."):
                try:
                    self.meta[key] = field.contents()
                except (ValueError, IndexError, UnicodeDecodeError) as exc:
                    raise InfqError(f"{path}: metadata {key} cannot be decoded ({exc}); re-export it") from None
        arch = self.meta.get("general.architecture")
        if arch != "llama":
            raise InfqError(f"{path} holds architecture {arch!r}; infq reads llama GGUF files only")
        for key in _REQUIRED:
            if key not in self.meta:
                raise InfqError(f"{path} lacks metadata {key}, which a llama model needs; re-export it")
        size = path.stat().st_size
        self.tensors: dict[str, Any] = {}
        for t in reader.tensors:
            if t.name == "rope_freqs.weight":
                raise InfqError(f"{path}: rope_freqs (Llama-3.1-style rope scaling) is not supported yet")
            if t.data_offset + t.n_bytes > size:
                raise InfqError(f"{path}: tensor {t.name} runs past the end of the file; it is truncated, re-download it")
            if t.tensor_type.name not in FLOAT_TYPES and t.tensor_type.name not in kquants.BLOCK_TYPES:
                raise InfqError(f"{path}: tensor {t.name} has GGML type {t.tensor_type.name}, which infq does not "
                                f"decode; supported: {', '.join(FLOAT_TYPES + tuple(kquants.BLOCK_TYPES))}")
            self.tensors[hf_name(t.name)] = t
        self.config = self._config()

    def _config(self) -> dict[str, Any]:
        m, p = self.meta, self.path
        heads = _int(m, "llama.attention.head_count", p)
        hidden = _int(m, "llama.embedding_length", p)
        head_dim = _int(m, "llama.attention.key_length", p, _int(m, "llama.rope.dimension_count", p, hidden // heads))
        tokens = m.get("tokenizer.ggml.tokens") or []
        embed = self.tensors.get("model.embed_tokens.weight")
        vocab = int(m.get("llama.vocab_size") or len(tokens) or (embed.shape[1] if embed is not None else 0))
        cfg: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "num_hidden_layers": _int(m, "llama.block_count", p),
            "intermediate_size": _int(m, "llama.feed_forward_length", p),
            "num_attention_heads": heads,
            "num_key_value_heads": _int(m, "llama.attention.head_count_kv", p, heads),
            "head_dim": head_dim,
            "rms_norm_eps": float(m["llama.attention.layer_norm_rms_epsilon"]),
            "max_position_embeddings": _int(m, "llama.context_length", p, 2048),
            "rope_theta": float(m.get("llama.rope.freq_base", 10000.0)),
            "vocab_size": vocab,
            "tie_word_embeddings": "lm_head.weight" not in self.tensors,
            "bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": m.get("tokenizer.ggml.eos_token_id"),
            "torch_dtype": "float16",
            "hidden_act": "silu",
        }
        scaling = m.get("llama.rope.scaling.type")
        if scaling not in (None, "none"):
            if scaling != "linear":
                raise InfqError(f"{p}: rope scaling {scaling!r} is not supported; infq reads linear scaling")
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(m["llama.rope.scaling.factor"])}
        return cfg

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def ggml_type(self, name: str) -> str:
        return str(self.tensors[name].tensor_type.name)

    def shape(self, name: str) -> tuple[int, ...]:
        """Torch order (ggml `ne` reversed)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def nbytes(self, name: str) -> int:
        return int(self.tensors[name].n_bytes)

    def _qk_heads(self, name: str) -> int | None:
        if name.endswith("self_attn.q_proj.weight"):
            return int(self.config["num_attention_heads"])
        if name.endswith("self_attn.k_proj.weight"):
            return int(self.config["num_key_value_heads"])
        return None

    def _row_order(self, name: str, rows: int) -> torch.Tensor | None:
        """Index that puts stored (adjacent-pair) q/k rows back into HF's rotate-half order."""
        heads = self._qk_heads(name)
        if heads is None:
            return None
        if rows % (2 * heads):
            raise InfqError(f"{self.path}: {name} has {rows} rows, not a multiple of 2 x {heads} heads")
        return unpermute_qk(torch.arange(rows)[:, None], heads)[:, 0]

    def blocks(self, name: str) -> torch.Tensor:
        """Raw GGML blocks (out, row_bytes) uint8 of a block-quantized 2-D tensor, rows in HF order."""
        t = self.tensors[name]
        out, inp = self.shape(name)
        data = np.asarray(t.data).view(np.uint8).reshape(out, -1)
        order = self._row_order(name, out)
        b = _view(data) if order is None else torch.from_numpy(data[order.numpy()])
        if not b.is_contiguous():
            b = b.contiguous()
        return b

    def dense(self, name: str) -> torch.Tensor:
        """The tensor decoded to float32, in HF order and torch shape."""
        t = self.tensors[name]
        shape = self.shape(name)
        q = t.tensor_type.name
        if q == "BF16":
            raw = np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16
            value = torch.from_numpy(raw.view(np.float32).copy()).reshape(shape)
        elif q in FLOAT_TYPES:
            value = torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(shape)
        else:
            rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            value = kquants.dequantize(_view(np.asarray(t.data).view(np.uint8).reshape(rows, -1)), q, shape[-1])
            value = value.reshape(shape)
        order = self._row_order(name, shape[0])
        return value if order is None else value[order].contiguous()

    def file_bytes(self) -> int:
        return self.path.stat().st_size

    def tokenizer(self) -> Any:
        from infq.formats.gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(self.path, self.meta)
