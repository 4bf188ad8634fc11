"""FP8 (E4M3FN) linears on disk: compressed-tensors `float-quantized` and vLLM's native `fp8` layout.

Both layouts store, per quantized linear (reference §A.3.2, §A.3.4): `weight` F8_E4M3 `(out, in)`
with `W ~ weight * weight_scale`, `weight_scale`, and `input_scale` only for static activations.
They differ in the scales: compressed-tensors keeps the model dtype and a shape per strategy
(`[1]` tensor, `[out, 1]` channel); vLLM `fp8` (AutoFP8's writer) keeps F32 scalars `[]` and
per-tensor weight scales only. Readers take either shape (`[]`, `[1]`, `[out, 1]`, `[out]`).
This module also reads and writes vLLM's `{"quant_method": "fp8", "activation_scheme": ...,
"ignored_layers": [...]}` config; the compressed-tensors config lives in compressed_tensors.py.
Limits: block-wise FP8 (`weight_block_size`, `weight_scale_inv`) and E5M2 weights are refused.
Tensors only (torch / safetensors), no torch.nn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from infq.errors import InfqError
from infq.formats.compressed_tensors import skip_from_ignore
from infq.quantizers.scheme import QuantConfig, QuantizedTensor, QuantScheme

LAYOUTS = ("compressed-tensors", "fp8")
PARTS = ("weight", "weight_scale", "input_scale")
MARKER = "weight_scale"  # with a float8 `weight` beside it: an FP8 linear


def quantized_tensor_to_fp8(qt: QuantizedTensor, bias: torch.Tensor | None, config: QuantConfig,
                            layout: str) -> dict[str, torch.Tensor]:
    """QuantizedTensor (kind fp8) -> {"weight", "weight_scale"[, "input_scale", "bias"]} of `layout`."""
    if qt.scheme.kind != "fp8":
        raise InfqError(f"{layout} FP8 stores e4m3 weights, not {qt.scheme.kind!r} codes; use another format")
    out, _ = qt.shape
    scales = qt.scales.detach().cpu()  # (out, 1)
    if config.weight_scale == "tensor" and not bool((scales == scales[0, 0]).all()):
        raise InfqError("this weight has one scale per channel, which a per-tensor layout cannot store; "
                        "write it with --weight-scale channel (compressed-tensors)")
    if layout == "fp8" and config.weight_scale != "tensor":
        raise InfqError("vLLM's fp8 layout stores one weight scale per tensor; use --weight-scale tensor "
                        "or --format compressed-tensors")
    if layout == "fp8":  # AutoFP8: F32 scalars
        weight_scale = scales[0, 0].to(torch.float32).reshape(())
    else:  # compressed-tensors: the model dtype, [1] or [out, 1]
        weight_scale = scales[:1, 0].clone() if config.weight_scale == "tensor" else scales.contiguous()
    tensors = {"weight": qt.codes.detach().cpu().contiguous(), "weight_scale": weight_scale}
    if config.act_scheme == "static":
        if qt.input_scale is None:
            raise InfqError("static activations need a calibrated input_scale, and this tensor has none; "
                            "quantize with --act-scheme static")
        act = qt.input_scale.detach().cpu().to(torch.float32)
        tensors["input_scale"] = act.reshape(()) if layout == "fp8" else act.reshape(1).to(scales.dtype)
    if bias is not None:
        if tuple(bias.shape) != (out,):
            raise ValueError(f"bias shape {tuple(bias.shape)} != ({out},)")
        tensors["bias"] = bias.detach().cpu().contiguous()
    return tensors


def fp8_to_quantized_tensor(tensors: Mapping[str, torch.Tensor], config: QuantConfig) -> QuantizedTensor:
    """FP8 tensors of one linear (either layout) -> QuantizedTensor of kind fp8, scales (out, 1) as stored."""
    missing = [k for k in ("weight", "weight_scale") if k not in tensors]
    if missing:
        raise InfqError(f"FP8 tensors {', '.join(missing)} are missing; the checkpoint is incomplete")
    weight = tensors["weight"].detach().cpu()
    if weight.dtype != torch.float8_e4m3fn:
        raise InfqError(f"FP8 weights must be F8_E4M3, got {weight.dtype}; E5M2 and other encodings are not supported")
    if weight.dim() != 2:
        raise InfqError(f"FP8 weight has shape {tuple(weight.shape)}, not (out, in); the checkpoint is corrupt")
    out, inp = weight.shape
    scale = tensors["weight_scale"].detach().cpu()
    if not scale.is_floating_point() or scale.dtype == torch.float8_e4m3fn:
        raise InfqError(f"weight_scale must be a float32/16 tensor, got {scale.dtype}; the checkpoint is corrupt")
    if scale.numel() == 1:
        scale = scale.reshape(1, 1).expand(out, 1).contiguous()  # per tensor
    elif tuple(scale.shape) in ((out, 1), (out,)):
        scale = scale.reshape(out, 1).contiguous()  # per channel
    else:
        raise InfqError(f"weight_scale shape {tuple(scale.shape)} is neither per-tensor nor per-channel ({out}, 1); "
                        "block-wise FP8 is not supported")
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise InfqError("weight_scale holds a zero, negative or non-finite value; the checkpoint is corrupt")
    act = None
    if config.act_scheme == "static":
        if "input_scale" not in tensors:
            raise InfqError("input_scale is missing although the config says static activations; the checkpoint is incomplete")
        act = tensors["input_scale"].detach().cpu().to(torch.float32)
        if act.numel() != 1:
            raise InfqError(f"input_scale has shape {tuple(act.shape)}; static activation scales are per tensor, "
                            "one value (per-token scales are dynamic only)")
        act = act.reshape(())
        if not bool(torch.isfinite(act)) or float(act) <= 0:
            raise InfqError(f"input_scale {float(act)} is not a positive finite number; the checkpoint is corrupt")
    return QuantizedTensor(
        codes=weight.contiguous(), scales=scale, zeros=None, g_idx=torch.zeros(inp, dtype=torch.int32),
        scheme=QuantScheme(bits=8, group_size=-1, sym=True, kind="fp8"), shape=(out, inp), input_scale=act,
    )


def check_fp8_layout(config: QuantConfig, layout: str) -> None:
    """Refuse, before any work, what `layout` cannot express."""
    if config.method != "fp8":
        raise InfqError(f"the {layout} FP8 layout stores --method fp8 weights, not {config.method}")
    if layout == "fp8" and config.weight_scale != "tensor":
        raise InfqError("vLLM's fp8 layout stores one weight scale per tensor; use --weight-scale tensor "
                        "or --format compressed-tensors")
    if layout == "fp8" and config.act_scheme == "none":
        raise InfqError("vLLM's fp8 layout has no weight-only mode (activation_scheme is static or dynamic); "
                        "use --act-scheme dynamic or --format compressed-tensors")


def vllm_fp8_config(config: QuantConfig, unquantized: Sequence[str] | None = None) -> dict[str, Any]:
    """config.json's quantization_config in vLLM's fp8 layout (AutoFP8). `ignored_layers` are the full
    names of the linears left in full precision (vLLM matches names exactly), lm_head first."""
    check_fp8_layout(config, "fp8")
    ignored = ([] if config.lm_head else ["lm_head"]) + list(unquantized or ())
    return {"quant_method": "fp8", "activation_scheme": config.act_scheme, "ignored_layers": ignored}


def parse_vllm_fp8_config(d: Mapping[str, Any]) -> QuantConfig:
    """vLLM / AutoFP8 `quant_method: fp8` config -> QuantConfig (per-tensor weights)."""
    method = str(d.get("quant_method") or "").lower()
    if method != "fp8":
        raise InfqError(f"quant_method {method!r} is not fp8; open this checkpoint with its own reader")
    if d.get("weight_block_size"):
        raise InfqError(f"block-wise FP8 (weight_block_size {d['weight_block_size']}) is not supported by this "
                        "version of infq; per-tensor FP8 checkpoints are")
    scheme = str(d.get("activation_scheme") or "dynamic").lower()
    if scheme not in ("static", "dynamic"):
        raise InfqError(f"activation_scheme {scheme!r} is unknown; vLLM fp8 uses static or dynamic")
    skip, lm_head = skip_from_ignore(d.get("ignored_layers") or d.get("modules_to_not_convert"))
    return QuantConfig(method="fp8", bits=8, group_size=-1, sym=True, weight_scale="tensor", act_scheme=scheme,
                       skip=skip, lm_head=lm_head)
