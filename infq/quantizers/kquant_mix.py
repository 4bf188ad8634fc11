"""K-quant mixes: which GGML type each tensor of a llama model gets for a llama.cpp file type name.

`plan_mix("Q4_K_M", shapes, ...)` returns a `MixPlan`: one `TensorPlan` per tensor (GGUF name, torch
shape, GGML type), the fallbacks taken, the user's `--tensor-type` overrides applied, the
`general.file_type` value, and the file's bits per weight. The rules are our reading of llama.cpp's
`llama_tensor_get_type` (src/llama-quant.cpp) for the mixes in `MIXES` and a dense llama model
(reference §A.5.1):

* only 2-D tensors whose name ends in `weight` and not `_norm.weight` are quantized; 1-D stay F32;
* every mix starts from its default type (Q4_K_M -> Q4_K, ...);
* `output.weight` (or `token_embd.weight` when the model has no separate output) -> Q6_K, or Q8_0
  when the mix is Q8_0 or the row is not a multiple of the default type's block;
* `attn_v`: Q2_K -> Q4_K if n_head / n_head_kv >= 4 else Q3_K; Q3_K_M -> Q5_K in the first two
  layers, else Q4_K; Q3_K_L -> Q5_K; Q4_K_M/Q5_K_M -> Q6_K where `use_more_bits`; Q4_K_S -> Q5_K in
  the first four layers; 80-layer (70B) models bump Q3_K/Q4_K to Q5_K;
* `ffn_down`: Q2_K -> Q3_K; Q3_K_M -> Q5_K below n/16, else Q4_K; Q3_K_L -> Q5_K; Q4_K_M/Q5_K_M ->
  Q6_K where `use_more_bits`; Q4_K_S -> Q5_K below n/8; Q4_0 with an imatrix -> Q4_1 below n/8;
* `attn_output`: Q2_K -> Q3_K, Q3_K_M -> Q4_K, Q3_K_L -> Q5_K;
  with `use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2` (integer division). llama.cpp
  counts attn_v/ffn_down tensors in its loader's order, which sorts by layer number: the count is
  the layer index.
* Fallback when a row (ne0, the input dim) is not a multiple of the chosen type's block:
  Q2_K/Q3_K -> IQ4_NL in llama.cpp, which infq does not implement: Q4_0 instead (the same
  4.5 bits per weight, also symmetric); Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0; then F16 when
  even the 32-block type does not fit (llama.cpp stops on a legacy type that does not fit; infq
  writes F16 and reports it).
* `--tensor-type REGEX=TYPE` overrides (re.search on the GGUF name, last match wins) apply, as in
  llama.cpp, only to tensors that took no fallback; an override whose block does not divide the
  row is refused.
Limits: dense llama-family models only (no MoE, fused qkv or Falcon rules); no IQ types.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from infq.errors import InfqError
from infq.quantizers.kquants import BLOCK_TYPES

# mix name -> (llama_ftype value written as general.file_type, default GGML type)
_MIXES = (
    ("Q2_K", 10, "Q2_K"), ("Q3_K_S", 11, "Q3_K"), ("Q3_K_M", 12, "Q3_K"), ("Q3_K_L", 13, "Q3_K"),
    ("Q4_K_S", 14, "Q4_K"), ("Q4_K_M", 15, "Q4_K"), ("Q5_K_S", 16, "Q5_K"), ("Q5_K_M", 17, "Q5_K"),
    ("Q6_K", 18, "Q6_K"), ("Q8_0", 7, "Q8_0"), ("Q4_0", 2, "Q4_0"),
)
MIXES = tuple(m for m, _, _ in _MIXES)
FLOAT_TYPES = (("F32", 4), ("F16", 2))  # unquantized types and their bytes per element
# llama.cpp's fallback for a row its type's block does not divide (IQ4_NL -> Q4_0, see the docstring)
_FALLBACK = (("Q2_K", "Q4_0"), ("Q3_K", "Q4_0"), ("Q4_K", "Q5_0"), ("Q5_K", "Q5_1"), ("Q6_K", "Q8_0"))


def _mix(name: str) -> tuple[int, str]:
    for m, ftype, default in _MIXES:
        if m == name.upper():
            return ftype, default
    raise InfqError(f"--type {name} is not a supported mix; use one of {', '.join(MIXES)}")


def default_type(mix: str) -> str:
    """The GGML type a mix starts every quantized tensor from (Q4_K_M -> Q4_K)."""
    return _mix(mix)[1]


def file_type(mix: str) -> int:
    """llama.cpp's `llama_ftype` value for a mix name (general.file_type)."""
    return _mix(mix)[0]


def block_size(qtype: str) -> int:
    return 1 if qtype in dict(FLOAT_TYPES) else BLOCK_TYPES[qtype].block


def type_bytes(qtype: str, n: int) -> int:
    """Bytes of n elements (a whole number of blocks) stored as `qtype`."""
    floats = dict(FLOAT_TYPES)
    if qtype in floats:
        return n * floats[qtype]
    t = BLOCK_TYPES[qtype]
    return n // t.block * t.nbytes


def check_type(qtype: str) -> str:
    """Canonical spelling of a GGML type name infq can write, or InfqError listing them."""
    q = qtype.upper()
    if q not in BLOCK_TYPES and q not in dict(FLOAT_TYPES):
        choices = ", ".join([*BLOCK_TYPES, *dict(FLOAT_TYPES)])
        raise InfqError(f"GGML type {qtype!r} is not supported; use one of {choices}")
    return q


def parse_overrides(specs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """`--tensor-type REGEX=TYPE` strings -> ((regex, TYPE), ...); InfqError for a bad one."""
    out = []
    for spec in specs:
        pattern, sep, qtype = spec.rpartition("=")
        if not sep or not pattern or not qtype:
            raise InfqError(f"--tensor-type {spec!r} is not REGEX=TYPE; e.g. --tensor-type 'attn_v=Q8_0'")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InfqError(f"--tensor-type regex {pattern!r} is invalid ({exc}); fix it") from exc
        out.append((pattern, check_type(qtype)))
    return tuple(out)


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class ModelShape:
    """What the mix rules read about the model."""

    n_layers: int
    n_head: int
    n_head_kv: int
    has_output: bool = True  # a separate output.weight (else token_embd doubles as the output)


@dataclass(frozen=True)
class TensorPlan:
    name: str  # GGUF name
    shape: tuple[int, ...]  # torch order: (out, in) for a matrix
    qtype: str  # GGML type written
    mix_type: str  # what the mix rules chose, before fallback and overrides
    note: str = ""  # "fallback ..." or "override ..." when qtype != mix_type

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return type_bytes(self.qtype, self.numel)


@dataclass(frozen=True)
class MixPlan:
    mix: str
    file_type: int
    tensors: tuple[TensorPlan, ...]

    def types(self) -> dict[str, str]:
        return {t.name: t.qtype for t in self.tensors}

    @property
    def fallbacks(self) -> list[dict[str, str]]:
        return [{"tensor": t.name, "from": t.mix_type, "to": t.qtype, "why": t.note}
                for t in self.tensors if t.note.startswith("fallback")]

    @property
    def overrides(self) -> list[dict[str, str]]:
        return [{"tensor": t.name, "from": t.mix_type, "to": t.qtype, "why": t.note}
                for t in self.tensors if t.note.startswith("override")]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        """Tensor data bits over all elements (1-D F32 tensors included), as llama.cpp's BPW."""
        n = sum(t.numel for t in self.tensors)
        return 8.0 * self.nbytes / n if n else 0.0

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.qtype] = counts.get(t.qtype, 0) + 1
        return dict(sorted(counts.items()))


def is_quantized(name: str, shape: Sequence[int]) -> bool:
    """llama.cpp's rule for which tensors a mix quantizes at all."""
    return name.endswith("weight") and len(shape) >= 2 and not name.endswith("_norm.weight")


_LAYER = re.compile(r"blk\.(\d+)\.")


def _layer(name: str) -> int:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def mix_type(mix: str, name: str, shape: Sequence[int], model: ModelShape, has_imatrix: bool) -> str:
    """The type llama.cpp's rules give tensor `name` under `mix` (before the block-size fallback)."""
    _, t = _mix(mix)
    mix = mix.upper()
    nx = shape[-1]
    if name == "output.weight" or (not model.has_output and name == "token_embd.weight"):
        if nx % block_size(t):
            return "Q8_0"
        return t if t == "Q8_0" else "Q6_K"
    i, n = _layer(name), model.n_layers
    if "attn_v.weight" in name:
        return _attn_v(mix, t, i, n, model)
    if "ffn_down" in name:
        return _ffn_down(mix, t, i, n, has_imatrix)
    if "attn_output.weight" in name:
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(mix, t)
    return t


def _attn_v(mix: str, t: str, i: int, n: int, model: ModelShape) -> str:
    gqa = model.n_head // max(model.n_head_kv, 1)
    if mix == "Q2_K":
        t = "Q4_K" if gqa >= 4 else "Q3_K"
    elif mix == "Q3_K_M":
        t = "Q5_K" if i < 2 else "Q4_K"
    elif mix == "Q3_K_L":
        t = "Q5_K"
    elif mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
        t = "Q6_K"
    elif mix == "Q4_K_S" and i < 4:
        t = "Q5_K"
    if n == 80 and t in ("Q3_K", "Q4_K"):  # llama.cpp's LLM_TYPE_70B: 8 heads share each attn_v row
        t = "Q5_K"
    return t


def _ffn_down(mix: str, t: str, i: int, n: int, has_imatrix: bool) -> str:
    if mix == "Q2_K":
        return "Q3_K"
    if mix == "Q3_K_M":
        return "Q5_K" if i < n // 16 else "Q4_K"
    if mix == "Q3_K_L":
        return "Q5_K"
    if mix in ("Q4_K_M", "Q5_K_M"):
        return "Q6_K" if use_more_bits(i, n) else t
    if mix == "Q4_K_S" and i < n // 8:
        return "Q5_K"
    if mix == "Q4_0" and has_imatrix and i < n // 8:
        return "Q4_1"
    return t


def _fallback(qtype: str, nx: int) -> str:
    if nx % block_size(qtype) == 0:
        return qtype
    new = dict(_FALLBACK).get(qtype, "F16")
    return new if nx % block_size(new) == 0 else "F16"


def plan_mix(mix: str, shapes: Mapping[str, Sequence[int]], model: ModelShape, has_imatrix: bool = False,
             overrides: Sequence[tuple[str, str]] = ()) -> MixPlan:
    """The type of every tensor (GGUF name -> torch shape) of a llama model under `mix`."""
    ftype, _ = _mix(mix)
    plans = []
    for name, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        if not is_quantized(name, shape):
            plans.append(TensorPlan(name, shape, "F32", "F32"))
            continue
        chosen = mix_type(mix, name, shape, model, has_imatrix)
        qtype, note = _fallback(chosen, shape[-1]), ""
        if qtype != chosen:
            note = f"fallback: row of {shape[-1]} is not a multiple of {chosen}'s block of {block_size(chosen)}"
        else:
            for pattern, forced in overrides:
                if re.search(pattern, name):
                    qtype, note = forced, f"override {pattern}={forced}"
            if shape[-1] % block_size(qtype):
                raise InfqError(f"--tensor-type makes {name} {qtype}, but its rows of {shape[-1]} are not a "
                                f"multiple of {qtype}'s block of {block_size(qtype)}; pick a type that fits")
            if qtype == chosen:
                note = ""
        plans.append(TensorPlan(name, shape, qtype, chosen, note))
    return MixPlan(mix.upper(), ftype, tuple(plans))
