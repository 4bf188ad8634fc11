"""GPTQ checkpoint pieces: bit packing, QuantizedTensor <-> GPTQ tensors, configs, sharded writing.

Layout per reference §A.1: `qweight` int32 `(in*bits/32, out)` packs codes LSB-first along the
input dim (3-bit: 32 rows in 3 words, a plain LSB-first bit stream); `qzeros` int32
`(G, out*bits/32)` packs zero points the same way along the output dim; `scales` fp16 `(G, out)`;
`g_idx` int32 `(in,)`; optional fp16 `bias (out,)`. Zero convention: v1 `"gptq"` stores zero-1
(every v1 reader adds 1 back), v2 `"gptq_v2"` stores the zero as is. numpy / safetensors / torch
tensors only, no torch.nn. Packing is vectorized over rows and columns; the only Python loops run
over the <= 32 positions of one packing cycle. Writing a whole checkpoint directory (tmp dir +
rename, config.json, tokenizer) belongs to the caller; `write_gptq_shards` (an alias of the
format-agnostic `safetensors_io.write_shards`) only writes the safetensors shards and their index
into a directory it is given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from infq import __version__
from infq.errors import InfqError
from infq.formats.safetensors_io import write_shards
from infq.quantizers.scheme import QuantConfig, QuantizedTensor, QuantScheme, check_group_size

FORMATS = ("gptq", "gptq_v2")  # checkpoint_format values: zero stored as zero-1 (v1) or as is (v2)
GPTQ_BITS = (2, 3, 4, 8)
U32 = npt.NDArray[np.uint32]

# --------------------------------------------------------------------------- bit packing


def _cycle(bits: int) -> tuple[int, int]:
    """(values, words) of one packing cycle: 32/bits values per word, or 32 values in 3 words at 3 bits."""
    if bits not in GPTQ_BITS:
        raise InfqError(f"bits {bits} cannot be packed in GPTQ format; use 2, 3, 4 or 8")
    g = math.gcd(bits, 32)
    return 32 // g, bits // g


def _pack_axis0(codes: npt.NDArray[Any], bits: int, what: str) -> U32:
    """codes (n, m) in [0, 2^bits) -> uint32 (n*bits/32, m); value k of a column at stream bits [k*b, k*b+b)."""
    values, words = _cycle(bits)
    n, m = codes.shape
    if n % values:
        raise InfqError(
            f"{what} {n} is not a multiple of {values}, which {bits}-bit GPTQ packing needs; "
            f"use a model whose dims are multiples of {values}, or skip this module"
        )
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"values to pack must lie in [0, {1 << bits}), got [{codes.min()}, {codes.max()}]")
    c = codes.reshape(n // values, values, m)  # (cycles, values, m)
    out = np.zeros((n // values, words, m), dtype=np.uint32)  # (cycles, words, m)
    for j in range(values):  # cycle positions, each vectorized over all cycles and columns
        word, off = divmod(j * bits, 32)
        v = c[:, j].astype(np.uint32)  # (cycles, m)
        out[:, word] |= v << off  # uint32 shift drops the bits that spill into the next word
        if off + bits > 32:
            out[:, word + 1] |= v >> (32 - off)
    return out.reshape(n // values * words, m)


def _unpack_axis0(packed: npt.NDArray[Any], bits: int) -> npt.NDArray[np.uint8]:
    """Inverse of _pack_axis0: int32/uint32 (n*bits/32, m) -> uint8 (n, m)."""
    values, words = _cycle(bits)
    rows, m = packed.shape
    if packed.dtype not in (np.int32, np.uint32):
        raise InfqError(f"packed GPTQ tensors must be int32, got {packed.dtype}; re-save with pack_dtype int32")
    if rows % words:
        raise InfqError(f"packed dim {rows} is not a multiple of {words} for {bits}-bit GPTQ; the checkpoint is corrupt")
    p = np.ascontiguousarray(packed).view(np.uint32).reshape(rows // words, words, m)  # (cycles, words, m)
    out = np.empty((rows // words, values, m), dtype=np.uint8)  # (cycles, values, m)
    mask = np.uint32((1 << bits) - 1)
    for j in range(values):
        word, off = divmod(j * bits, 32)
        v = p[:, word] >> off
        if off + bits > 32:
            v = v | (p[:, word + 1] << (32 - off))
        out[:, j] = v & mask
    return out.reshape(rows // words * values, m)


def pack_rows(codes: npt.NDArray[Any], bits: int) -> npt.NDArray[np.int32]:
    """Codes (in, out) -> qweight int32 (in*bits/32, out), packed along the input dim, LSB-first."""
    return _pack_axis0(codes, bits, "input dim").view(np.int32)


def unpack_rows(qweight: npt.NDArray[Any], bits: int) -> npt.NDArray[np.uint8]:
    """qweight int32 (in*bits/32, out) -> codes uint8 (in, out)."""
    return _unpack_axis0(qweight, bits)


def pack_cols(values: npt.NDArray[Any], bits: int) -> npt.NDArray[np.int32]:
    """Stored zeros (G, out) -> qzeros int32 (G, out*bits/32), packed along the output dim."""
    packed = _pack_axis0(np.ascontiguousarray(values.T), bits, "output dim")  # (out*bits/32, G)
    return np.ascontiguousarray(packed.T).view(np.int32)


def unpack_cols(qzeros: npt.NDArray[Any], bits: int) -> npt.NDArray[np.uint8]:
    """qzeros int32 (G, out*bits/32) -> stored zeros uint8 (G, out)."""
    return np.ascontiguousarray(_unpack_axis0(np.ascontiguousarray(qzeros.T), bits).T)


# --------------------------------------------------------------------------- tensors


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise InfqError(f"checkpoint_format {fmt!r} is not supported; use 'gptq' (v1) or 'gptq_v2'")


def quantized_tensor_to_gptq(
    qt: QuantizedTensor, bias: torch.Tensor | None = None, fmt: str = "gptq"
) -> dict[str, torch.Tensor]:
    """QuantizedTensor -> {"qweight", "qzeros", "scales", "g_idx"[, "bias"]} (suffixes of a module name)."""
    _check_fmt(fmt)
    if qt.scheme.kind != "int" or qt.zeros is None:
        raise InfqError(f"GPTQ format stores integer schemes only, not {qt.scheme.kind!r}; use another format")
    bits, (out, _) = qt.scheme.bits, qt.shape
    qweight = pack_rows(qt.codes.cpu().numpy().T, bits)  # (in*bits/32, out)
    zeros = qt.zeros.cpu().numpy().T.astype(np.int64)  # (G, out)
    stored = zeros - 1 if fmt == "gptq" else zeros
    if stored.size and int(stored.min()) < 0:
        raise InfqError("a zero point of 0 cannot be stored in v1 'gptq' format (it stores zero-1); "
                        "write checkpoint_format 'gptq_v2' or quantize with sym=True")
    if stored.size and int(stored.max()) > qt.scheme.maxq:
        raise InfqError(f"a zero point of {qt.scheme.maxq + 1} (read from a v1 checkpoint) cannot be "
                        "stored in 'gptq_v2'; write checkpoint_format 'gptq'")
    scales = qt.scales.detach().cpu().T.to(torch.float16).contiguous()  # (G, out)
    if not bool(torch.isfinite(scales).all()):
        raise InfqError("scales overflow float16; requantize with infq (its scales are fp16-exact)")
    tensors = {
        "qweight": torch.from_numpy(qweight),
        "qzeros": torch.from_numpy(pack_cols(stored, bits)),  # (G, out*bits/32)
        "scales": scales,
        "g_idx": qt.g_idx.detach().cpu().to(torch.int32).contiguous(),  # (in,)
    }
    if bias is not None:
        if tuple(bias.shape) != (out,):
            raise ValueError(f"bias shape {tuple(bias.shape)} != ({out},)")
        tensors["bias"] = bias.detach().cpu().to(torch.float16).contiguous()
    return tensors


def sym_zero_convention(stored: npt.NDArray[Any], bits: int) -> str | None:
    """For a sym checkpoint: 'gptq' if every stored zero is 2^(b-1)-1, 'gptq_v2' if 2^(b-1), else None."""
    half = 1 << (bits - 1)
    if stored.size and bool((stored == half - 1).all()):
        return "gptq"
    if stored.size and bool((stored == half).all()):
        return "gptq_v2"
    return None


def gptq_to_quantized_tensor(
    tensors: Mapping[str, torch.Tensor],
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool,
    fmt: str = "gptq",
    detect_sym_zeros: bool = True,
) -> QuantizedTensor:
    """GPTQ tensors of one linear (keys qweight, qzeros, scales[, g_idx]) -> QuantizedTensor.

    Without desc_act the stored g_idx is ignored and arange(in)//group_size used, as vLLM does.
    With sym and detect_sym_zeros, zeros that are all 2^(b-1)-1 (v1) or all 2^(b-1) (v2) override
    `fmt`, since some checkpoints store v2 zeros under "gptq" (reference §A.1.5).
    """
    _check_fmt(fmt)
    missing = [k for k in ("qweight", "qzeros", "scales") if k not in tensors]
    if missing:
        raise InfqError(f"GPTQ tensors {', '.join(missing)} are missing; the checkpoint is incomplete")
    codes = unpack_rows(tensors["qweight"].cpu().numpy(), bits)  # (in, out)
    inp, out = codes.shape
    scales = tensors["scales"].detach().cpu()  # (G, out)
    n_groups = check_group_size(inp, group_size)
    if tuple(scales.shape) != (n_groups, out):
        raise InfqError(f"scales shape {tuple(scales.shape)} != ({n_groups}, {out}) for in={inp}, "
                        f"group_size={group_size}; check group_size in the quantization config")
    stored = unpack_cols(tensors["qzeros"].cpu().numpy(), bits)  # (G, out)
    if stored.shape != (n_groups, out):
        raise InfqError(f"qzeros unpacks to {stored.shape}, expected ({n_groups}, {out}); the checkpoint is corrupt")
    convention = (sym_zero_convention(stored, bits) if sym and detect_sym_zeros else None) or fmt
    zeros = stored.astype(np.int32) + (1 if convention == "gptq" else 0)  # (G, out)
    gs = inp // n_groups
    g_idx = (torch.arange(inp) // gs).to(torch.int32)  # (in,)
    if desc_act and "g_idx" in tensors:
        g_idx = tensors["g_idx"].detach().cpu().to(torch.int32)
        if tuple(g_idx.shape) != (inp,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
            raise InfqError(f"g_idx must be ({inp},) with values in [0, {n_groups}); the checkpoint is corrupt")
    return QuantizedTensor(
        codes=torch.from_numpy(np.ascontiguousarray(codes.T)),  # (out, in)
        scales=scales.T.contiguous(),  # (out, G)
        zeros=torch.from_numpy(np.ascontiguousarray(zeros.T)),  # (out, G)
        g_idx=g_idx.contiguous(),
        scheme=QuantScheme(bits=bits, group_size=group_size, sym=sym, kind="int"),
        shape=(out, inp),
    )


# --------------------------------------------------------------------------- configs


def default_checkpoint_format(config: QuantConfig) -> str:
    """v1 for sym (widest reader support, identical values); v2 for asym, which v1 cannot store (§A.1.5)."""
    return "gptq" if config.sym else "gptq_v2"


def gptq_quantization_config(config: QuantConfig, fmt: str | None = None) -> dict[str, Any]:
    """config.json's `quantization_config` for a GPTQ (or RTN-in-GPTQ-format) checkpoint (§A.1.1)."""
    if config.method not in ("gptq", "rtn", "awq"):
        raise InfqError(f"method {config.method} is not written in GPTQ format; use method gptq, rtn or awq")
    fmt = fmt or default_checkpoint_format(config)
    _check_fmt(fmt)
    d: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": config.bits,
        "group_size": config.group_size,
        "desc_act": config.desc_act,
        "sym": config.sym,
        "lm_head": config.lm_head,
        "damp_percent": config.damp_percent,
        "true_sequential": config.true_sequential,
        "static_groups": config.static_groups,
        "checkpoint_format": fmt,
        "pack_dtype": "int32",
        "model_file_base_name": "model",
        "meta": {
            "quantizer": [f"infq:{__version__}"],
            "damp_percent": config.damp_percent,
            "static_groups": config.static_groups,
            "true_sequential": config.true_sequential,
            "infq_method": config.method,
            "nsamples": config.nsamples,
            "seqlen": config.seqlen,
        },
    }
    if config.skip:  # GPTQModel/vLLM "dynamic": a "-:" key = leave matching modules unquantized
        d["dynamic"] = {f"-:{p}": {} for p in config.skip}
    return d


def gptq_quantize_config_json(config: QuantConfig, fmt: str | None = None) -> dict[str, Any]:
    """Content of quantize_config.json: the same dict as `quantization_config` (§A.1.1)."""
    return gptq_quantization_config(config, fmt)


def _first(d: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    raise InfqError(f"GPTQ quantization config lacks {keys[0]!r}; add it to quantize_config.json")


def _skip_from_dynamic(dynamic: Mapping[str, Any]) -> tuple[str, ...]:
    skip = []
    for key, override in dynamic.items():
        if key.startswith("-:"):
            skip.append(key[2:])
        elif override:
            raise InfqError(f"per-module overrides in 'dynamic' ({key!r}) are not supported; "
                            "requantize with one setting for all modules")
    return tuple(skip)


def parse_gptq_config(d: Mapping[str, Any]) -> tuple[QuantConfig, str]:
    """quantization_config / quantize_config.json (AutoGPTQ, GPTQModel, transformers) -> (config, fmt)."""
    method = str(d.get("quant_method") or d.get("method") or "gptq").lower()
    if method != "gptq":
        raise InfqError(f"quant_method {method!r} is not gptq; open this checkpoint with its own reader")
    if d.get("is_marlin_format"):
        raise InfqError("Marlin-repacked GPTQ checkpoints (is_marlin_format) are not supported; "
                        "use the original gptq checkpoint")
    fmt = str(d.get("checkpoint_format") or d.get("format") or "gptq").lower()
    if fmt not in FORMATS:
        raise InfqError(f"checkpoint_format {fmt!r} is not supported; infq reads 'gptq' and 'gptq_v2' "
                        "(re-save the model in gptq format)")
    pack_dtype = str(d.get("pack_dtype") or "int32").removeprefix("torch.")
    if pack_dtype != "int32":
        raise InfqError(f"pack_dtype {pack_dtype!r} is not supported; re-save with pack_dtype int32")
    if d.get("modules_in_block_to_quantize"):
        raise InfqError("modules_in_block_to_quantize is not supported; requantize all block linears "
                        "or list the others under 'dynamic' as '-:' skips")
    meta = d.get("meta") or {}

    def pick(key: str, default: Any) -> Any:  # AutoGPTQ keeps these top-level, GPTQModel in meta
        value = d.get(key)
        return meta.get(key, default) if value is None else value

    infq_method = meta.get("infq_method")
    config = QuantConfig(
        method=infq_method if infq_method in ("gptq", "rtn", "awq") else "gptq",
        bits=_first(d, "bits", "w_bit"),
        group_size=_first(d, "group_size", "q_group_size"),
        sym=pick("sym", True),
        desc_act=pick("desc_act", False),
        static_groups=pick("static_groups", False),
        damp_percent=pick("damp_percent", 0.01),
        true_sequential=pick("true_sequential", True),
        nsamples=meta.get("nsamples", 128),
        seqlen=meta.get("seqlen", 2048),
        skip=_skip_from_dynamic(d.get("dynamic") or {}),
        lm_head=bool(d.get("lm_head", False)),
    )
    return config, fmt


# Shards are format-agnostic; the old name stays for existing callers.
write_gptq_shards = write_shards
