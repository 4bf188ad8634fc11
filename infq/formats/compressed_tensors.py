"""compressed-tensors `pack-quantized` checkpoint pieces (llm-compressor W4A16 / W4A16_ASYM / W8A16).

Layout per reference §A.3.5: `weight_packed` int32 `(out, ceil(in/(32/b)))` holds the signed codes
offset by +2^(b-1) (so they are infq's unsigned codes), LSB-first along the input dim and
zero-padded to a whole word (signed -8..-1 in columns 0..7 give 0x76543210); `weight_scale`
`(out, G)` (group) or `(out, 1)` (channel) in the model dtype (infq writes float16, the dtype its
scales are exact in); `weight_zero_point` int32 `(ceil(out/(32/b)), G)`, only when asymmetric,
packed the same way along the OUTPUT dim (dim 0); `weight_shape` int32 `[out, in]`; `weight_g_idx`
int32 `(in,)` only with actorder "group". Codes map as: CT signed code = code - 2^(b-1), CT zero
point = zero - 2^(b-1) (0, and not stored, when symmetric). Bits 4 and 8 only (what vLLM's
pack-quantized reader takes). The config schema of FP8 checkpoints (`float-quantized` for W8A8 FP8
and FP8_DYNAMIC, `naive-quantized` for FP8 weight-only, as llm-compressor names them) is written
and parsed here too; their tensors are in fp8.py. Integer W8A8 is refused. numpy / safetensors /
torch tensors only, no torch.nn.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from infq.errors import InfqError
from infq.quantizers.scheme import QuantConfig, QuantizedTensor, QuantScheme, check_group_size

CT_BITS = (4, 8)

# --------------------------------------------------------------------------- bit packing


def _check_bits(bits: int) -> None:
    if bits not in CT_BITS:
        raise InfqError(f"compressed-tensors pack-quantized is read by vLLM at 4 and 8 bits only, not {bits}; "
                        "write GPTQ for 2- or 3-bit weights")


def pack_ct(values: npt.NDArray[Any], bits: int) -> npt.NDArray[np.int32]:
    """Unsigned values (n, m) in [0, 2^bits) -> int32 (n, ceil(m/(32/bits))), LSB-first along dim 1."""
    _check_bits(bits)
    pf = 32 // bits
    n, m = values.shape
    if values.size and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"values to pack must lie in [0, {1 << bits}), got [{values.min()}, {values.max()}]")
    words = math.ceil(m / pf)
    v = np.zeros((n, words * pf), dtype=np.uint32)  # zero padding to a whole word
    v[:, :m] = values
    v = v.reshape(n, words, pf)
    packed = np.zeros((n, words), dtype=np.uint32)
    for k in range(pf):
        packed |= v[:, :, k] << np.uint32(bits * k)
    return packed.view(np.int32)


def unpack_ct(packed: npt.NDArray[Any], bits: int, m: int) -> npt.NDArray[np.uint8]:
    """Inverse of pack_ct: int32 (n, ceil(m/(32/bits))) -> uint8 (n, m) (padding dropped)."""
    _check_bits(bits)
    pf = 32 // bits
    if packed.dtype not in (np.int32, np.uint32):
        raise InfqError(f"packed compressed-tensors tensors must be int32, got {packed.dtype}; the checkpoint is corrupt")
    n, words = packed.shape
    if words != math.ceil(m / pf):
        raise InfqError(f"a packed dim of {words} words cannot hold {m} {bits}-bit values; the checkpoint is corrupt")
    p = np.ascontiguousarray(packed).view(np.uint32)
    out = np.empty((n, words, pf), dtype=np.uint8)
    mask = np.uint32((1 << bits) - 1)
    for k in range(pf):
        out[:, :, k] = (p >> np.uint32(bits * k)) & mask
    return out.reshape(n, words * pf)[:, :m]


# --------------------------------------------------------------------------- tensors


def quantized_tensor_to_ct(
    qt: QuantizedTensor,
    bias: torch.Tensor | None = None,
    actorder_group: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """QuantizedTensor -> {"weight_packed", "weight_scale", "weight_shape"[, "weight_zero_point",
    "weight_g_idx", "bias"]} (suffixes of a module name).

    Symmetric (qt.scheme.sym) stores no zero point, so every zero must be 2^(b-1). `actorder_group`
    writes `weight_g_idx` (config actorder "group"); without it the groups must be contiguous.
    Scales keep their dtype unless `scale_dtype` is given; a bias is returned unchanged.
    """
    if qt.scheme.kind != "int" or qt.zeros is None:
        raise InfqError(f"pack-quantized stores integer schemes only, not {qt.scheme.kind!r}; use another format")
    bits, (out, inp), half = qt.scheme.bits, qt.shape, 1 << (qt.scheme.bits - 1)
    _check_bits(bits)
    if qt.scheme.group_size == -1 and qt.n_groups != 1:
        raise ValueError(f"a per-channel scheme has one group, not {qt.n_groups}")
    gs = inp if qt.scheme.group_size == -1 else qt.scheme.group_size
    contiguous = torch.equal(qt.g_idx.long().cpu(), torch.arange(inp) // max(gs, 1))
    if not actorder_group and not contiguous:
        raise InfqError("this tensor has an act-order g_idx (groups are not contiguous input channels); "
                        "write it with actorder 'group' (weight_g_idx), or as GPTQ")
    zeros = qt.zeros.cpu()  # (out, G)
    if qt.scheme.sym and not bool((zeros == half).all()):
        raise InfqError(f"zero points differ from {half}, so this tensor cannot be written symmetric; "
                        "write it asymmetric (weight_zero_point)")
    if zeros.numel() and int(zeros.max()) >= 1 << bits:
        raise InfqError(f"a zero point of {1 << bits} (read from a v1 GPTQ checkpoint) does not fit the "
                        f"{bits}-bit weight_zero_point; this conversion would lose information")
    scales = qt.scales.detach().cpu().to(scale_dtype or qt.scales.dtype).contiguous()  # (out, G)
    if not bool(torch.isfinite(scales).all()):
        raise InfqError(f"scales overflow {scales.dtype}; keep them in a wider dtype")
    tensors = {
        "weight_packed": torch.from_numpy(pack_ct(qt.codes.cpu().numpy(), bits)),  # (out, ceil(in/pf))
        "weight_scale": scales,
        "weight_shape": torch.tensor([out, inp], dtype=torch.int32),
    }
    if not qt.scheme.sym:
        packed = pack_ct(np.ascontiguousarray(zeros.numpy().T), bits)  # (G, ceil(out/pf))
        tensors["weight_zero_point"] = torch.from_numpy(np.ascontiguousarray(packed.T))  # (ceil(out/pf), G)
    if actorder_group:
        tensors["weight_g_idx"] = qt.g_idx.detach().cpu().to(torch.int32).contiguous()
    if bias is not None:
        if tuple(bias.shape) != (out,):
            raise ValueError(f"bias shape {tuple(bias.shape)} != ({out},)")
        tensors["bias"] = bias.detach().cpu().contiguous()
    return tensors


def ct_to_quantized_tensor(
    tensors: Mapping[str, torch.Tensor], bits: int, group_size: int, sym: bool
) -> QuantizedTensor:
    """pack-quantized tensors of one linear -> QuantizedTensor. `group_size` -1 = channel strategy.

    A stored `weight_g_idx` (actorder "group") is honoured; a symmetric checkpoint's zero point
    (older writers stored zeros) is ignored, as it is 0 by definition.
    """
    _check_bits(bits)
    missing = [k for k in ("weight_packed", "weight_scale") if k not in tensors]
    if missing:
        raise InfqError(f"compressed-tensors tensors {', '.join(missing)} are missing; the checkpoint is incomplete")
    packed = tensors["weight_packed"].cpu().numpy()
    out = packed.shape[0]
    if "weight_shape" in tensors:
        shape = [int(x) for x in tensors["weight_shape"].reshape(-1).tolist()]
        if len(shape) != 2 or shape[0] != out:
            raise InfqError(f"weight_shape {shape} does not match weight_packed {tuple(packed.shape)}; the checkpoint is corrupt")
        inp = shape[1]
    else:
        inp = packed.shape[1] * (32 // bits)
    codes = unpack_ct(packed, bits, inp)  # (out, in)
    n_groups = check_group_size(inp, group_size)
    scales = tensors["weight_scale"].detach().cpu()  # (out, G)
    if tuple(scales.shape) != (out, n_groups):
        raise InfqError(f"weight_scale shape {tuple(scales.shape)} != ({out}, {n_groups}) for in={inp}, "
                        f"group_size={group_size}; check the config's group_size")
    half = 1 << (bits - 1)
    if sym:
        zeros = torch.full((out, n_groups), half, dtype=torch.int32)
    else:
        if "weight_zero_point" not in tensors:
            raise InfqError("weight_zero_point is missing for an asymmetric scheme; the checkpoint is incomplete")
        zp = tensors["weight_zero_point"].cpu().numpy()
        if zp.ndim != 2 or zp.shape[1] != n_groups:
            raise InfqError(f"weight_zero_point shape {zp.shape} does not hold ({out}, {n_groups}); the checkpoint is corrupt")
        stored = unpack_ct(np.ascontiguousarray(zp.T), bits, out)  # (G, out): zp + 2^(b-1) = infq's zero
        zeros = torch.from_numpy(np.ascontiguousarray(stored.T).astype(np.int32))
    g_idx = (torch.arange(inp) // (inp // n_groups)).to(torch.int32)  # (in,)
    if "weight_g_idx" in tensors:
        g_idx = tensors["weight_g_idx"].detach().cpu().to(torch.int32)
        if tuple(g_idx.shape) != (inp,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
            raise InfqError(f"weight_g_idx must be ({inp},) with values in [0, {n_groups}); the checkpoint is corrupt")
    return QuantizedTensor(
        codes=torch.from_numpy(np.ascontiguousarray(codes)),
        scales=scales.contiguous(),
        zeros=zeros,
        g_idx=g_idx.contiguous(),
        scheme=QuantScheme(bits=bits, group_size=group_size, sym=sym, kind="int"),
        shape=(out, inp),
    )


# --------------------------------------------------------------------------- configs


def ct_actorder(config: QuantConfig) -> str | None:
    """The weights' `actorder`: "group" stores weight_g_idx, "weight" (static groups) needs none.

    Note: compressed-tensors 0.20 dropped "group" (its config validation refuses it); older versions
    and the vLLM releases built on them read it. Static groups ("weight") load everywhere.
    """
    if not config.desc_act or config.group_size == -1:
        return None  # compressed-tensors allows actorder only with the group strategy
    return "weight" if config.static_groups else "group"


def ct_weight_args(config: QuantConfig) -> dict[str, Any]:
    """The `weights` QuantizationArgs of a pack-quantized config group."""
    _check_bits(config.bits)
    channel = config.group_size == -1
    return {
        "num_bits": config.bits,
        "type": "int",
        "symmetric": config.sym,
        "group_size": None if channel else config.group_size,
        "strategy": "channel" if channel else "group",
        "block_structure": None,
        "dynamic": False,
        "actorder": ct_actorder(config),
        "observer": "minmax",
        "observer_kwargs": {},
    }


def ct_fp8_args(config: QuantConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(weights, input_activations) QuantizationArgs of an FP8 config group, as llm-compressor's FP8
    (tensor weights, static tensor activations) and FP8_DYNAMIC (channel weights, dynamic per-token
    activations) presets write them; act_scheme "none" has no input_activations."""
    base = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "block_structure": None,
            "actorder": None, "observer_kwargs": {}}
    weights = {**base, "strategy": config.weight_scale, "dynamic": False, "observer": "minmax"}
    if config.act_scheme == "none":
        return weights, None
    static = config.act_scheme == "static"  # the running max over the data: llm-compressor's static_minmax
    acts = {**base, "strategy": "tensor" if static else "token", "dynamic": not static,
            "observer": "static_minmax" if static else None}
    return weights, acts


def ct_quantization_config(config: QuantConfig) -> dict[str, Any]:
    """config.json's `quantization_config` for a pack-quantized checkpoint (§A.3.3), as llm-compressor
    writes W4A16 / W4A16_ASYM / W8A16, or for FP8 (float-quantized; naive-quantized when weight-only).
    `ignore` lists lm_head (unless quantized) and every skip regex as "re:<pattern>" (matched with
    re.match by compressed-tensors and vLLM, as infq does)."""
    ignore = ([] if config.lm_head else ["lm_head"]) + [f"re:{p}" for p in config.skip]
    if config.method == "fp8":
        weights, acts = ct_fp8_args(config)
        fmt = "naive-quantized" if acts is None else "float-quantized"
    else:
        weights, acts, fmt = ct_weight_args(config), None, "pack-quantized"
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": acts,
                "output_activations": None,
            },
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _weights_key(name: str, group: Mapping[str, Any], fmt: str) -> tuple[int, bool, int, str | None]:
    """(bits, symmetric, group_size or -1, actorder) of one config group, or InfqError naming why not."""
    w = group.get("weights") or {}
    kind = str(w.get("type") or "int").lower()
    if kind != "int":
        raise InfqError(f"config group {name} quantizes weights to {kind} and another group to int; infq reads "
                        "one weight scheme per checkpoint")
    acts = [k for k in ("input_activations", "output_activations") if group.get(k)]
    if acts:
        raise InfqError(f"config group {name} also quantizes activations ({acts[0]}, e.g. W8A8); only weight-only "
                        "schemes (W4A16, W8A16) are read by this version of infq")
    if fmt != "pack-quantized":
        raise InfqError(f"compressed-tensors format {fmt!r} is not supported; infq reads 'pack-quantized' "
                        "(re-save with llm-compressor's W4A16 or W8A16 scheme)")
    if not w:
        raise InfqError(f"config group {name} has no weights scheme; the checkpoint has nothing to dequantize")
    bits = w.get("num_bits", 8)
    _check_bits(bits)
    raw = w.get("group_size")
    group_size = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
    strategy = str(w.get("strategy") or ("group" if (group_size or 0) > 0 else "channel" if group_size == -1
                                          else "tensor")).lower()
    if strategy not in ("group", "channel"):
        raise InfqError(f"weight strategy {strategy!r} is not supported; infq reads 'group' and 'channel'")
    if w.get("dynamic"):
        raise InfqError("dynamic weight quantization has no stored scales; the checkpoint cannot be read")
    if strategy == "channel":
        gs = -1
    elif group_size is not None and group_size > 0:
        gs = group_size
    else:
        raise InfqError(f"strategy 'group' needs a positive group_size, got {raw!r}; fix the config")
    return bits, bool(w.get("symmetric", True)), gs, _actorder(w.get("actorder"))


def _actorder(value: Any) -> str | None:
    """QuantizationArgs.actorder with its aliases (true/"dynamic" -> group, "static" -> weight)."""
    if value is None or value is False:
        return None
    if value is True or str(value).lower() in ("group", "dynamic"):
        return "group"
    if str(value).lower() in ("weight", "static"):
        return "weight"
    raise InfqError(f"actorder {value!r} is unknown; use null, 'group' or 'weight'")


def parse_ct_config(d: Mapping[str, Any]) -> QuantConfig:
    """quantization_config of a compressed-tensors checkpoint (llm-compressor) -> QuantConfig.

    Reads weight-only int pack-quantized schemes (W4A16, W4A16_ASYM, W8A16, group or channel,
    actorder group/weight); refuses everything else with a one-line reason.
    """
    method = str(d.get("quant_method") or "").lower()
    if method != "compressed-tensors":
        raise InfqError(f"quant_method {method!r} is not compressed-tensors; open this checkpoint with its own reader")
    status = str(d.get("quantization_status") or "compressed").lower()
    if status != "compressed":
        raise InfqError(f"quantization_status is {status!r}: the weights are not packed; save the model "
                        "compressed (llm-compressor save_compressed=True)")
    sparsity = d.get("sparsity_config") or {}
    if sparsity and str(sparsity.get("format") or "dense") != "dense":
        raise InfqError(f"sparse compressed-tensors checkpoints ({sparsity.get('format')}) are not supported")
    if d.get("kv_cache_scheme"):
        raise InfqError("quantized KV cache (kv_cache_scheme) is not supported by this version of infq")
    groups = d.get("config_groups") or {}
    if not groups:
        raise InfqError("compressed-tensors config has no config_groups; nothing is quantized")
    if any(is_float_group(g) for g in groups.values()):
        return _parse_fp8(d, groups)
    keys = {_weights_key(name, g, str(g.get("format") or d.get("format") or "")) for name, g in groups.items()}
    if len(keys) > 1:
        raise InfqError("config groups quantize modules differently (mixed precision); infq reads one weight "
                        "scheme per checkpoint")
    bits, sym, group_size, actorder = keys.pop()
    skip, lm_head = skip_from_ignore(d.get("ignore"))
    return QuantConfig(
        method="gptq",  # the file does not say; gptq is what llm-compressor's W4A16 recipes run
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=actorder is not None,
        static_groups=actorder == "weight",
        skip=skip,
        lm_head=lm_head,
    )


def skip_from_ignore(ignore: Any) -> tuple[tuple[str, ...], bool]:
    """An ignore list (module names, or regexes prefixed "re:") -> (skip regexes for the block linears,
    whether lm_head is quantized, i.e. not ignored)."""
    patterns = tuple(x[3:] if x.startswith("re:") else re.escape(x) + "$" for x in map(str, ignore or ()))
    head_ignored = any(re.match(p, "lm_head") for p in patterns)
    return tuple(p for p in patterns if not re.match(p, "lm_head")), not head_ignored


# --------------------------------------------------------------------------- FP8 configs


def is_float_group(group: Mapping[str, Any]) -> bool:
    """True for a config group whose weights are floats (FP8, FP4)."""
    return str(((group or {}).get("weights") or {}).get("type") or "int").lower() == "float"


def _fp8_key(name: str, group: Mapping[str, Any], fmt: str) -> tuple[str, str]:
    """(weight_scale, act_scheme) of one FP8 config group, or InfqError naming why it cannot be read."""
    w = group.get("weights") or {}
    if not is_float_group(group):
        raise InfqError(f"config group {name} quantizes weights to int while another group uses FP8; infq reads "
                        "one weight scheme per checkpoint")
    if w.get("num_bits", 8) != 8:
        raise InfqError(f"config group {name} has {w.get('num_bits')}-bit float weights (FP4); only FP8 is supported")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise InfqError(f"compressed-tensors format {fmt!r} is not an FP8 layout; infq reads 'float-quantized' "
                        "(and 'naive-quantized' weight-only) FP8 checkpoints")
    strategy = str(w.get("strategy") or "tensor").lower()
    if strategy not in ("tensor", "channel"):
        raise InfqError(f"FP8 weight strategy {strategy!r} is not supported (block-wise, group); infq reads "
                        "'tensor' and 'channel'")
    if w.get("dynamic") or not w.get("symmetric", True):
        raise InfqError("FP8 weights must be static and symmetric; the checkpoint cannot be read")
    if group.get("output_activations"):
        raise InfqError(f"config group {name} quantizes output activations; infq does not support that")
    a = group.get("input_activations")
    if not a:
        return strategy, "none"
    if str(a.get("type") or "int").lower() != "float" or a.get("num_bits", 8) != 8:
        raise InfqError(f"config group {name} quantizes activations to {a.get('type')}{a.get('num_bits')}; "
                        "infq reads FP8 (float, 8-bit) activations")
    astrat, dynamic = str(a.get("strategy") or "tensor").lower(), a.get("dynamic")
    if dynamic is True:
        if astrat not in ("token", "tensor"):
            raise InfqError(f"dynamic activation strategy {astrat!r} is not supported; infq reads 'token' and 'tensor'")
        return strategy, "dynamic"
    if dynamic:  # "local" (FP4 global scales)
        raise InfqError(f"activation dynamic={dynamic!r} is not supported; use true or false")
    if astrat != "tensor":
        raise InfqError(f"static {astrat} activation scales cannot be stored (only a per-tensor input_scale is); "
                        "the format needs dynamic: true for per-token activations")
    return strategy, "static"


def _parse_fp8(d: Mapping[str, Any], groups: Mapping[str, Any]) -> QuantConfig:
    """An FP8 compressed-tensors config (llm-compressor FP8 / FP8_DYNAMIC / FP8 weight-only) -> QuantConfig."""
    top = str(d.get("format") or "")
    keys = {_fp8_key(name, g, str(g.get("format") or top)) for name, g in groups.items()}
    if len(keys) > 1:
        raise InfqError("config groups quantize modules differently (mixed FP8 schemes); infq reads one scheme "
                        "per checkpoint")
    weight_scale, act_scheme = keys.pop()
    skip, lm_head = skip_from_ignore(d.get("ignore"))
    return QuantConfig(method="fp8", bits=8, group_size=-1, sym=True, weight_scale=weight_scale,
                       act_scheme=act_scheme, skip=skip, lm_head=lm_head)
