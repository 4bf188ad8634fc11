"""The shared vocabulary of every quantizer: QuantConfig, QuantScheme and QuantizedTensor.

`QuantConfig` is what the user asked for (method, bits, group size, GPTQ knobs), validated on
construction and serialisable with `to_dict`/`from_dict`. `QuantScheme` says how integer codes map
to values. `QuantizedTensor` is the one canonical in-memory form of a quantized weight: unpacked
codes (uint8, `(out, in)`), fp16 scales and int32 zero points per `(row, group)`, and `g_idx`
(int32, `(in,)`) naming the group of every input channel; `dequantize()` is the reference decoder
`(codes - zeros[:, g_idx]) * scales[:, g_idx]`. Formats pack it, kernels repack it; nothing here
knows about files or devices. Kind "fp8" holds float8_e4m3fn codes with one scale per output row
(`(out, 1)`, all equal for a per-tensor scale) and an optional calibrated `input_scale`; its
decoder `codes * scales` is here too. Kind "gguf:<TYPE>" (TYPE a GGML block type such as Q4_K, see
`quantizers.kquants.BLOCK_TYPES`) holds the raw GGML block bytes as they lie in a GGUF file: codes
uint8 `(out, in / block * type_size)`, no scales or zeros of its own (`(out, 0)` and None: they live
inside the blocks), `g_idx` the block of every input channel; its `dequantize()` calls the kquants
decoder (bit-identical to gguf-py's). Build one with `QuantizedTensor.from_gguf`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from infq.errors import InfqError

METHODS = ("rtn", "gptq", "awq", "fp8", "kquant")
# Bit widths each method can produce (a tuple of pairs, not a dict: no module-level mutable state).
# awq: any int width (its GEMM format is 4-bit only; 3-bit AWQ is written as GPTQ v2);
# kquant: Q2_K..Q6_K and Q8_0.
_VALID_BITS = (
    ("rtn", (2, 3, 4, 8)),
    ("gptq", (2, 3, 4, 8)),
    ("awq", (2, 3, 4, 8)),
    ("fp8", (8,)),
    ("kquant", (2, 3, 4, 5, 6, 8)),
)
INT_METHODS = ("rtn", "gptq", "awq")
FP8_WEIGHT_SCALES = ("tensor", "channel")  # one e4m3 weight scale per tensor or per output row
FP8_ACT_SCHEMES = ("static", "dynamic", "none")  # calibrated per-tensor, per token at run time, weight-only


def valid_bits(method: str) -> tuple[int, ...]:
    """Bit widths `method` supports; () for an unknown method."""
    return next((b for m, b in _VALID_BITS if m == method), ())


def _words(values: tuple[object, ...]) -> str:
    """(2, 3, 4) -> '2, 3 or 4'."""
    text = [str(v) for v in values]
    return text[0] if len(text) == 1 else ", ".join(text[:-1]) + " or " + text[-1]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_group_size(in_features: int, group_size: int) -> int:
    """Number of groups for an input dim; InfqError naming the dim and valid choices if it does not divide."""
    if group_size == -1:
        return 1
    if group_size <= 0 or in_features % group_size:
        divisors = [d for d in (32, 64, 128, 256, 512, 1024) if in_features % d == 0]
        choices = "-1 (per-channel)" + (" or " + _words(tuple(divisors)) if divisors else "")
        raise InfqError(
            f"group_size {group_size} does not divide the input dim {in_features} of this weight; "
            f"use {choices}, or another divisor of {in_features}"
        )
    return in_features // group_size


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how. Validated on construction; every error names the fix."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128  # -1 = one group per output row (per-channel)
    sym: bool = True
    desc_act: bool = False  # GPTQ act-order: process columns by decreasing Hessian diagonal
    static_groups: bool = False  # with desc_act: groups fixed on the original column order
    damp_percent: float = 0.01  # Hessian dampening, fraction of mean(diag(H)), in (0, 1)
    true_sequential: bool = True
    nsamples: int = 128  # calibration sequences
    seqlen: int = 2048  # tokens per calibration sequence
    skip: tuple[str, ...] = ()  # regexes (re.match on module names) left unquantized
    lm_head: bool = False  # quantize lm_head too; otherwise it is always skipped
    weight_scale: str = "channel"  # fp8: see FP8_WEIGHT_SCALES
    act_scheme: str = "dynamic"  # fp8: see FP8_ACT_SCHEMES
    act_percentile: float = 100.0  # fp8 static: percentile of the per-token max |x| taken as the amax

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InfqError(f"method {self.method!r} is unknown; use one of {', '.join(METHODS)}")
        bits = valid_bits(self.method)
        if not _is_int(self.bits) or self.bits not in bits:
            raise InfqError(
                f"bits {self.bits} is not supported by {self.method}; use {_words(bits)}"
            )
        if not _is_int(self.group_size) or not (self.group_size == -1 or self.group_size > 0):
            raise InfqError(
                f"group_size {self.group_size} is invalid; use -1 (per-channel) or a positive "
                "integer such as 128"
            )
        for name in ("sym", "desc_act", "static_groups", "true_sequential", "lm_head"):
            if not isinstance(getattr(self, name), bool):
                raise InfqError(f"{name} must be true or false, got {getattr(self, name)!r}")
        damp = self.damp_percent
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
            raise InfqError(
                f"damp_percent {damp} is out of range; use a value in (0, 1) such as 0.01 "
                "(raise it, e.g. to 0.1, if the Cholesky factorisation fails)"
            )
        if self.desc_act and self.method != "gptq":
            raise InfqError(
                f"desc_act needs a Hessian and only gptq uses one; set desc_act=False for {self.method}"
            )
        for name in ("nsamples", "seqlen"):
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise InfqError(f"{name} {getattr(self, name)} must be a positive integer")
        if isinstance(self.skip, str) or not isinstance(self.skip, tuple):
            raise InfqError(f"skip must be a tuple of regex patterns, got {self.skip!r}")
        for pattern in self.skip:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:
                raise InfqError(f"skip pattern {pattern!r} is not a valid regex ({exc}); fix it") from exc
        self._check_fp8()

    def _check_fp8(self) -> None:
        if self.weight_scale not in FP8_WEIGHT_SCALES:
            raise InfqError(f"weight_scale {self.weight_scale!r} is unknown; use {_words(FP8_WEIGHT_SCALES)}")
        if self.act_scheme not in FP8_ACT_SCHEMES:
            raise InfqError(f"act_scheme {self.act_scheme!r} is unknown; use {_words(FP8_ACT_SCHEMES)}")
        p = self.act_percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100:
            raise InfqError(f"act_percentile {p} is out of range; use a value in (0, 100] such as 99.99")
        if p != 100 and self.act_scheme != "static":
            raise InfqError(f"act_percentile applies to calibrated (static) input scales, not act_scheme "
                            f"{self.act_scheme!r}; use act_scheme static or drop the percentile")
        if self.method == "fp8" and (self.group_size != -1 or not self.sym):
            raise InfqError("fp8 scales are symmetric and per tensor or per channel, never per group; "
                            "use group_size -1, sym and weight_scale tensor|channel")

    def is_skipped(self, module_name: str) -> bool:
        """True if `module_name` stays unquantized: lm_head (unless lm_head=True) or a skip match."""
        if not self.lm_head and module_name.split(".")[-1] == "lm_head":
            return True
        return any(re.match(p, module_name) for p in self.skip)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (skip as a list)."""
        d = asdict(self)
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantConfig:
        """Inverse of to_dict; unknown keys raise InfqError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InfqError(
                f"unknown quantization config key(s) {', '.join(unknown)}; valid keys are "
                f"{', '.join(sorted(known))}"
            )
        kwargs = dict(d)
        if isinstance(kwargs.get("skip"), list):
            kwargs["skip"] = tuple(kwargs["skip"])
        return cls(**kwargs)


@dataclass(frozen=True)
class QuantScheme:
    """How codes map to values. kind "int": w = scale * (q - zero), q in [0, 2^bits)."""

    bits: int
    group_size: int  # -1 = one group spanning the whole input dim
    sym: bool = True
    kind: str = "int"  # "int", "fp8" (e4m3 codes, w = code * scale) or "gguf:<TYPE>" (GGML blocks)

    def __post_init__(self) -> None:
        if not (self.kind in ("int", "fp8") or self.kind.startswith("gguf:")):
            raise InfqError(f"scheme kind {self.kind!r} is unknown; use 'int', 'fp8' or 'gguf:<type>'")
        if self.kind.startswith("gguf:"):
            from infq.quantizers.kquants import block_type

            t = block_type(self.kind[5:])  # InfqError naming the supported GGML types
            if self.kind[5:] != t.name or self.group_size != t.block:
                raise InfqError(f"scheme {self.kind} needs kind 'gguf:{t.name}' and group_size {t.block}; "
                                "build it with QuantScheme.gguf")
        if not _is_int(self.bits) or not 1 <= self.bits <= 8:
            raise InfqError(f"scheme bits {self.bits} is invalid; use an integer in 1..8")
        if not _is_int(self.group_size) or not (self.group_size == -1 or self.group_size > 0):
            raise InfqError(f"scheme group_size {self.group_size} is invalid; use -1 or a positive int")

    @property
    def maxq(self) -> int:
        """Largest code, 2^bits - 1."""
        return (1 << self.bits) - 1

    @property
    def ggml_type(self) -> str:
        """GGML block type name of a gguf kind ('Q4_K'); '' for other kinds."""
        return self.kind[5:] if self.kind.startswith("gguf:") else ""

    @classmethod
    def gguf(cls, qtype: str) -> QuantScheme:
        """The scheme of GGML block type `qtype`: nominal bits from the name (Q4_K -> 4), the block
        as group size, sym for the types without a min (Q8_0, Q4_0, Q5_0, Q3_K, Q6_K)."""
        from infq.quantizers.kquants import block_type

        t = block_type(qtype)
        return cls(bits=int(t.name[1]), group_size=t.block, sym=t.name in ("Q8_0", "Q4_0", "Q5_0", "Q3_K", "Q6_K"),
                   kind=f"gguf:{t.name}")

    @classmethod
    def from_config(cls, config: QuantConfig) -> QuantScheme:
        if config.method not in INT_METHODS:
            raise InfqError(f"method {config.method} has no integer scheme; use rtn, gptq or awq")
        return cls(bits=config.bits, group_size=config.group_size, sym=config.sym, kind="int")


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized linear weight of logical shape (out, in), unpacked.

    codes  uint8  (out, in)        integer codes in [0, 2^bits) (kind "fp8": float8_e4m3fn)
    scales float  (out, G)         per-group scale; infq's quantizers store float16
    zeros  int32  (out, G) | None  integer zero points in [0, 2^bits] (2^bits only when read
                                   from a v1 checkpoint); always present for kind "int" (sym
                                   stores 2^(bits-1), as GPTQ does)
    g_idx  int32  (in,)            group of each input channel: arange(in) // group_size, or a
                                   permuted assignment for act-order
    input_scale float32 () | None  kind "fp8" with static activations: the calibrated per-tensor
                                   activation scale (x ~ x8 * input_scale)

    Kind "gguf:<TYPE>": codes uint8 (out, in / block * type_size) are the GGML block bytes of
    each row, scales an empty (out, 0), zeros None, g_idx int32 (in,) the block of each channel.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor
    scheme: QuantScheme
    shape: tuple[int, int]
    input_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        out, inp = self.shape
        if self.scheme.kind.startswith("gguf:"):
            self._check_gguf()
            return
        if tuple(self.codes.shape) != (out, inp):
            raise ValueError(f"codes shape {tuple(self.codes.shape)} != {self.shape}")
        if self.scales.dim() != 2 or self.scales.shape[0] != out:
            raise ValueError(f"scales shape {tuple(self.scales.shape)} is not ({out}, G)")
        if not self.scales.is_floating_point():
            raise ValueError(f"scales must be floating point, got {self.scales.dtype}")
        if tuple(self.g_idx.shape) != (inp,) or self.g_idx.dtype != torch.int32:
            raise ValueError(f"g_idx must be int32 ({inp},), got {self.g_idx.dtype} {tuple(self.g_idx.shape)}")
        if self.scheme.kind == "fp8":
            self._check_fp8()
        if self.scheme.kind != "int":
            return
        n_groups = self.scales.shape[1]
        if self.scheme.group_size != -1 and n_groups * self.scheme.group_size != inp:
            raise ValueError(f"{n_groups} groups of {self.scheme.group_size} != in {inp}")
        if self.codes.dtype != torch.uint8:
            raise ValueError(f"int codes must be uint8, got {self.codes.dtype}")
        if self.zeros is None or self.zeros.dtype != torch.int32:
            raise ValueError("int schemes need int32 zeros")
        if tuple(self.zeros.shape) != tuple(self.scales.shape):
            raise ValueError(f"zeros shape {tuple(self.zeros.shape)} != scales {tuple(self.scales.shape)}")
        if inp and (int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= n_groups):
            raise ValueError(f"g_idx values must lie in [0, {n_groups})")

    def _check_fp8(self) -> None:
        if self.codes.dtype != torch.float8_e4m3fn:
            raise ValueError(f"fp8 codes must be float8_e4m3fn, got {self.codes.dtype}")
        if self.scales.shape[1] != 1 or self.zeros is not None:
            raise ValueError("fp8 has one scale per row, (out, 1), and no zero points")
        if self.input_scale is not None and self.input_scale.numel() != 1:
            raise ValueError(f"input_scale must hold one value, got shape {tuple(self.input_scale.shape)}")

    def _check_gguf(self) -> None:
        from infq.quantizers.kquants import block_type

        t = block_type(self.scheme.ggml_type)
        out, inp = self.shape
        if inp % t.block:
            raise ValueError(f"{t.name} rows hold multiples of {t.block} values, not {inp}")
        row_bytes = inp // t.block * t.nbytes
        if self.codes.dtype != torch.uint8 or tuple(self.codes.shape) != (out, row_bytes):
            raise ValueError(f"{t.name} codes must be uint8 ({out}, {row_bytes}), got "
                             f"{self.codes.dtype} {tuple(self.codes.shape)}")
        if tuple(self.scales.shape) != (out, 0) or self.zeros is not None:
            raise ValueError("gguf tensors keep scales inside their blocks: scales (out, 0), zeros None")
        if tuple(self.g_idx.shape) != (inp,) or self.g_idx.dtype != torch.int32:
            raise ValueError(f"g_idx must be int32 ({inp},)")

    @classmethod
    def from_gguf(cls, data: Any, qtype: str, shape: tuple[int, int]) -> QuantizedTensor:
        """Wrap GGML block bytes (uint8 (out, in / block * type_size), numpy or torch) of type `qtype`
        and logical shape (out, in); the bytes are shared, not copied, where possible."""
        scheme = QuantScheme.gguf(qtype)
        out, inp = int(shape[0]), int(shape[1])
        codes = torch.as_tensor(data)
        if codes.dtype != torch.uint8:
            raise InfqError(f"{scheme.ggml_type} data must be bytes (uint8), got {codes.dtype}")
        codes = codes.reshape(out, -1) if codes.numel() and out else codes.reshape(out, 0)
        g_idx = (torch.arange(inp, device=codes.device) // scheme.group_size).to(torch.int32)
        try:
            return cls(codes=codes, scales=torch.empty(out, 0, dtype=torch.float16, device=codes.device),
                       zeros=None, g_idx=g_idx, scheme=scheme, shape=(out, inp))
        except ValueError as exc:
            raise InfqError(f"{scheme.ggml_type} tensor of shape {(out, inp)}: {exc}; the data or shape is wrong") from exc

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | None = None) -> torch.Tensor:
        """Reference decoder -> (out, in) (or the given rows). Computed in fp32: (q - z) * fp16 scale
        is exact there. Contiguous groups are broadcast in place: one (rows, in) float buffer.
        fp8: code * scale in fp32, exact for half-precision scales (4 times 11 significant bits)."""
        if self.scheme.kind == "fp8":
            rows = rows or slice(None)
            w = self.codes[rows].to(torch.float32)  # (r, in)
            return w.mul_(self.scales[rows].to(torch.float32)).to(dtype)
        if self.scheme.kind.startswith("gguf:"):
            from infq.quantizers.kquants import dequantize

            blocks = self.codes[rows or slice(None)]  # (r, in / block * type_size) uint8
            return dequantize(blocks.cpu(), self.scheme.ggml_type, self.shape[1]).to(blocks.device, dtype)
        if self.scheme.kind != "int" or self.zeros is None:
            raise NotImplementedError(f"dequantize of kind {self.scheme.kind!r} lives in its format module")
        rows = rows or slice(None)
        w = self.codes[rows].to(torch.float32)  # (r, in)
        zeros = self.zeros[rows].to(torch.float32)  # (r, G)
        scales = self.scales[rows].to(torch.float32)  # (r, G)
        r, n = w.shape
        G = self.n_groups
        if n and n % G == 0 and torch.equal(self.g_idx, _contiguous_groups(n, G, self.g_idx.device)):
            wg = w.view(r, G, n // G)
            wg.sub_(zeros[..., None]).mul_(scales[..., None])
        else:
            g = self.g_idx.long()  # (in,) any assignment (act-order)
            w.sub_(zeros[:, g]).mul_(scales[:, g])
        return w.to(dtype)

    @property
    def bits_per_weight(self) -> float:
        """Packed storage of codes + fp16 scales + zeros (at `bits` each) per weight; g_idx excluded."""
        out, inp = self.shape
        return 8.0 * self.nbytes / (out * inp) if out * inp else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of the packed form: codes and zeros at `bits` each, scales as fp16; g_idx excluded."""
        out, inp = self.shape
        if self.scheme.kind.startswith("gguf:"):  # the blocks hold everything
            return self.codes.numel()
        if self.scheme.kind == "fp8":  # codes + scales as stored (a per-tensor scale is counted per row)
            return out * inp + self.scales.numel() * self.scales.element_size()
        groups = out * self.n_groups
        bits = out * inp * self.scheme.bits + groups * 16
        if self.zeros is not None:
            bits += groups * self.scheme.bits
        return (bits + 7) // 8


def _contiguous_groups(n: int, groups: int, device: torch.device) -> torch.Tensor:
    """g_idx of `groups` contiguous groups over n channels: arange(n) // (n / groups)."""
    return (torch.arange(n, device=device) // (n // groups)).to(torch.int32)
