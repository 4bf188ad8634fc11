"""AWQ "GEMM" checkpoint pieces (AutoAWQ `WQLinear_GEMM`): packing, QuantizedTensor <-> tensors, configs.

Layout per reference §A.2: `qweight` int32 `(in, out/8)` packs 4-bit codes along the OUTPUT dim,
nibble i of word c holding output column 8c + AWQ_ORDER[i] (order [0,2,4,6,1,3,5,7], so codes
0..7 in columns 0..7 give 0x75316420); `qzeros` int32 `(G, out/8)` packs the raw zero points the
same way (no -1, unlike GPTQ v1); `scales` fp16 `(G, out)`; optional fp16 `bias (out,)`. AWQ has
no g_idx: groups are contiguous runs of `group_size` input channels, so an act-order
QuantizedTensor cannot be written here. 4-bit only (the only width AutoAWQ's GEMM module, vLLM
and transformers read); other AWQ layouts (gemv, exllama, llm-awq's own) are not byte-compatible
and are refused. numpy / safetensors / torch tensors only, no torch.nn.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from infq import __version__
from infq.errors import InfqError
from infq.quantizers.scheme import QuantConfig, QuantizedTensor, QuantScheme, check_group_size

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds output column 8c + AWQ_ORDER[i]
AWQ_BITS = 4
_BITS_FIX = ("AWQ GEMM format is 4-bit only; for {bits} bits use --format gptq (2, 3, 4, 8) "
             "or --format compressed-tensors (4, 8)")

# --------------------------------------------------------------------------- bit packing


def pack_awq(values: npt.NDArray[Any]) -> npt.NDArray[np.int32]:
    """4-bit values (rows, out) -> int32 (rows, out/8), interleaved along the output dim."""
    rows, out = values.shape
    if out % 8:
        raise InfqError(f"output dim {out} is not a multiple of 8, which AWQ packing needs; "
                        "write GPTQ or compressed-tensors, or skip this module")
    if values.size and (int(values.min()) < 0 or int(values.max()) > 15):
        raise ValueError(f"values to pack must lie in [0, 16), got [{values.min()}, {values.max()}]")
    v = values.reshape(rows, out // 8, 8).astype(np.uint32)  # (rows, words, 8 logical columns)
    packed = np.zeros((rows, out // 8), dtype=np.uint32)
    for nibble, column in enumerate(AWQ_ORDER):
        packed |= v[:, :, column] << np.uint32(4 * nibble)
    return packed.view(np.int32)


def unpack_awq(packed: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """Inverse of pack_awq: int32 (rows, out/8) -> uint8 (rows, out)."""
    if packed.dtype not in (np.int32, np.uint32):
        raise InfqError(f"packed AWQ tensors must be int32, got {packed.dtype}; the checkpoint is not AWQ GEMM")
    rows, words = packed.shape
    p = np.ascontiguousarray(packed).view(np.uint32)
    out = np.empty((rows, words, 8), dtype=np.uint8)  # (rows, words, 8 logical columns)
    for nibble, column in enumerate(AWQ_ORDER):
        out[:, :, column] = (p >> np.uint32(4 * nibble)) & np.uint32(0xF)
    return out.reshape(rows, words * 8)


# --------------------------------------------------------------------------- tensors


def contiguous_groups(qt: QuantizedTensor) -> bool:
    """True if g_idx is arange(in) // group_size (no act-order permutation); -1 means one group."""
    inp = qt.shape[1]
    if qt.scheme.group_size == -1:
        return qt.n_groups == 1
    return bool(torch.equal(qt.g_idx.long().cpu(), torch.arange(inp) // qt.scheme.group_size))


def quantized_tensor_to_awq(qt: QuantizedTensor, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """QuantizedTensor -> {"qweight", "qzeros", "scales"[, "bias"]} (suffixes of a module name)."""
    if qt.scheme.kind != "int" or qt.zeros is None:
        raise InfqError(f"AWQ format stores integer schemes only, not {qt.scheme.kind!r}; use another format")
    if qt.scheme.bits != AWQ_BITS:
        raise InfqError(_BITS_FIX.format(bits=qt.scheme.bits))
    if not contiguous_groups(qt):
        raise InfqError("this tensor has an act-order g_idx (groups are not contiguous input channels) and "
                        "AWQ stores no g_idx; write GPTQ or compressed-tensors, or quantize without act-order")
    out = qt.shape[0]
    zeros = qt.zeros.cpu().numpy().T  # (G, out)
    if zeros.size and int(zeros.max()) > 15:
        raise InfqError("a zero point of 16 (read from a v1 GPTQ checkpoint) does not fit AWQ's 4-bit qzeros; "
                        "this conversion would lose information")
    scales = qt.scales.detach().cpu().T.to(torch.float16).contiguous()  # (G, out)
    if not bool(torch.isfinite(scales).all()):
        raise InfqError("scales overflow float16; requantize with infq (its scales are fp16-exact)")
    tensors = {
        "qweight": torch.from_numpy(pack_awq(qt.codes.cpu().numpy().T)),  # (in, out/8)
        "qzeros": torch.from_numpy(pack_awq(zeros)),  # (G, out/8)
        "scales": scales,
    }
    if bias is not None:
        if tuple(bias.shape) != (out,):
            raise ValueError(f"bias shape {tuple(bias.shape)} != ({out},)")
        tensors["bias"] = bias.detach().cpu().to(torch.float16).contiguous()
    return tensors


def awq_to_quantized_tensor(
    tensors: Mapping[str, torch.Tensor], bits: int, group_size: int, sym: bool = False
) -> QuantizedTensor:
    """AWQ GEMM tensors of one linear (keys qweight, qzeros, scales) -> QuantizedTensor.

    `sym` only labels the scheme (AWQ always stores its zeros, which decide the values).
    """
    if bits != AWQ_BITS:
        raise InfqError(f"AWQ GEMM checkpoints are 4-bit; this config says bits={bits}, which is not AWQ GEMM")
    missing = [k for k in ("qweight", "qzeros", "scales") if k not in tensors]
    if missing:
        raise InfqError(f"AWQ tensors {', '.join(missing)} are missing; the checkpoint is incomplete")
    codes = unpack_awq(tensors["qweight"].cpu().numpy())  # (in, out)
    inp, out = codes.shape
    n_groups = check_group_size(inp, group_size)
    scales = tensors["scales"].detach().cpu()  # (G, out)
    if tuple(scales.shape) != (n_groups, out):
        raise InfqError(f"scales shape {tuple(scales.shape)} != ({n_groups}, {out}) for in={inp}, "
                        f"group_size={group_size}; check group_size in the quantization config")
    zeros = unpack_awq(tensors["qzeros"].cpu().numpy())  # (G, out)
    if zeros.shape != (n_groups, out):
        raise InfqError(f"qzeros unpacks to {zeros.shape}, expected ({n_groups}, {out}); the checkpoint is corrupt")
    return QuantizedTensor(
        codes=torch.from_numpy(np.ascontiguousarray(codes.T)),  # (out, in)
        scales=scales.T.contiguous(),  # (out, G)
        zeros=torch.from_numpy(np.ascontiguousarray(zeros.T).astype(np.int32)),  # (out, G)
        g_idx=(torch.arange(inp) // (inp // n_groups)).to(torch.int32),  # (in,)
        scheme=QuantScheme(bits=bits, group_size=group_size, sym=sym, kind="int"),
        shape=(out, inp),
    )


# --------------------------------------------------------------------------- configs


def awq_quantization_config(
    config: QuantConfig, modules_to_not_convert: Sequence[str] | None = None
) -> dict[str, Any]:
    """config.json's `quantization_config` for an AWQ GEMM checkpoint (§A.2.1) plus infq provenance.

    `modules_to_not_convert`: full names of the block linears left unquantized (AWQ readers match
    these as substrings, not regexes); required when `config.skip` is set. lm_head is never
    quantized by AWQ readers and is not listed.
    """
    if config.bits != AWQ_BITS:
        raise InfqError(_BITS_FIX.format(bits=config.bits))
    if config.lm_head:
        raise InfqError("AWQ readers never load a quantized lm_head; drop --lm-head or write GPTQ")
    if config.desc_act and not config.static_groups and config.group_size != -1:
        raise InfqError("act-order (desc_act without static_groups) needs a g_idx, which AWQ does not store; "
                        "write GPTQ or compressed-tensors, or use --static-groups")
    if config.skip and modules_to_not_convert is None:
        raise ValueError("config.skip is set: pass the skipped module names as modules_to_not_convert")
    return {
        "quant_method": "awq",
        "zero_point": True,
        "group_size": config.group_size,
        "bits": AWQ_BITS,
        "version": "gemm",
        "modules_to_not_convert": list(modules_to_not_convert) if modules_to_not_convert else None,
        "meta": {  # ignored by AutoAWQ / transformers / vLLM; lets infq read back what it wrote
            "quantizer": [f"infq:{__version__}"],
            "infq_method": config.method,
            "sym": config.sym,
            "nsamples": config.nsamples,
            "seqlen": config.seqlen,
        },
    }


def _first(d: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    raise InfqError(f"AWQ quantization config lacks {keys[0]!r}; add it to config.json's quantization_config")


def parse_awq_config(d: Mapping[str, Any]) -> QuantConfig:
    """quantization_config (AutoAWQ / transformers; synonyms w_bit, q_group_size) -> QuantConfig."""
    method = str(d.get("quant_method") or "awq").lower()
    if method != "awq":
        raise InfqError(f"quant_method {method!r} is not awq; open this checkpoint with its own reader")
    version = str(d.get("version") or "gemm").lower()
    if version != "gemm":
        raise InfqError(f"AWQ version {version!r} stores another tensor layout; infq reads AWQ 'gemm' only "
                        "(re-save the model with AutoAWQ version GEMM)")
    backend = str(d.get("backend") or "autoawq").lower()
    if backend != "autoawq":
        raise InfqError(f"AWQ backend {backend!r} (llm-awq's own layout) is not the GEMM layout infq reads; "
                        "re-save the model with AutoAWQ version GEMM")
    if d.get("zero_point") is False:
        raise InfqError("AWQ with zero_point false has no GEMM layout (AutoAWQ's GEMM module needs zeros); "
                        "requantize with zero_point true")
    bits = _first(d, "bits", "w_bit")
    if bits != AWQ_BITS:
        raise InfqError(f"AWQ GEMM checkpoints are 4-bit; this config says bits={bits}, which is not AWQ GEMM")
    meta = d.get("meta") or {}
    infq_method = meta.get("infq_method")
    skip = tuple(".*" + re.escape(str(name)) for name in d.get("modules_to_not_convert") or ())
    return QuantConfig(
        method=infq_method if infq_method in ("awq", "gptq", "rtn") else "awq",
        bits=bits,
        group_size=_first(d, "group_size", "q_group_size"),
        sym=bool(meta.get("sym", False)),  # AutoAWQ's zero_point=True is asymmetric
        nsamples=meta.get("nsamples", 128),
        seqlen=meta.get("seqlen", 2048),
        skip=skip,
    )
