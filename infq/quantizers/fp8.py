"""FP8 (E4M3FN) weights with per-tensor or per-channel scales, and static activation scales.

Reference §A.3.1 / §B.3: `s = amax(|W|) / 448` per tensor or per output row, codes
`cast_e4m3(clamp(W / s, -448, 448))`, dequantized `W ~ codes * s`. Two deliberate choices so that
what is written is exactly what was computed and nothing saturates:
  * scales are rounded UP to the dtype they are stored in (the model's half type, as compressed-
    tensors stores them; float32 otherwise), so |W / s| <= 448 holds with the stored scale;
  * a zero amax (an all-zero row, a never-active input) gets the dtype's smallest normal as its
    scale instead of 0: codes stay 0 and no reader divides by zero.
PyTorch's cast to float8_e4m3fn rounds to nearest even; whether it saturates depends on the
build and device (§A.3.1: it does not), hence the explicit clamp.
Static activation scales (`act_scheme="static"`) are `amax(|x|) / 448` over the calibration data
seen by the shared driver (LayerStats.amax), or, with `act_percentile` p < 100, the nearest-rank
p-th percentile of the per-token maxima (LayerStats.token_amax), which clips the rarest outlier
tokens. Dynamic activations need no calibration (per token at run time); "none" is weight-only.
Pure functions; inputs are never mutated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from infq.errors import InfqError
from infq.quantizers.calibrate import LayerStats
from infq.quantizers.scheme import QuantConfig, QuantizedTensor, QuantScheme

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def ceil_to_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Smallest value of `dtype` >= x (x >= 0; compared in float64), returned as float32; 0 ->
    dtype's tiny. +inf where x exceeds the dtype's range."""
    x = x.to(torch.float64)
    y = x.to(dtype)
    up = torch.nextafter(y, torch.full_like(y, float("inf")))
    y = torch.where(y.to(torch.float64) < x, up, y)
    tiny = torch.full_like(y, torch.finfo(dtype).tiny)
    return torch.where(y > 0, y, tiny).to(torch.float32)


def e4m3_scale(amax: Tensor, dtype: torch.dtype) -> Tensor:
    """amax / 448 rounded up to `dtype` (float32 result), never zero; InfqError if it overflows."""
    scale = ceil_to_dtype(amax.to(torch.float64) / E4M3_MAX, dtype)  # float64: the ceiling of the exact quotient
    if not bool(torch.isfinite(scale).all()):
        raise InfqError(f"a scale of amax/448 overflows {dtype} (|values| above ~{torch.finfo(dtype).max * 448:.3g}); "
                        "rescale or --skip this module")
    return scale


def to_e4m3(x: Tensor) -> Tensor:
    """Saturating cast to float8_e4m3fn (round to nearest even)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def percentile_amax(token_amax: Tensor, percentile: float) -> Tensor:
    """Nearest-rank percentile of per-token maxima: the k-th smallest, k = ceil(p/100 * n)."""
    n = token_amax.numel()
    k = min(n, max(1, math.ceil(percentile / 100.0 * n)))
    return token_amax.reshape(-1).float().kthvalue(k).values


def input_scale(stats: LayerStats, config: QuantConfig, dtype: torch.dtype) -> Tensor:
    """The static per-tensor activation scale () float32 from calibration statistics."""
    if not stats.tokens or stats.amax is None:
        raise InfqError("static FP8 activation scales need calibration data, and this linear saw none; "
                        "pass --dataset, or use --act-scheme dynamic")
    if config.act_percentile < 100:
        if stats.token_amax is None:
            raise InfqError("an activation percentile needs per-token maxima, which were not collected")
        amax = percentile_amax(stats.token_amax, config.act_percentile)
    else:
        amax = stats.amax
    if not bool(torch.isfinite(amax)):
        raise InfqError("calibration activations contain NaN or inf; check the model in full precision first")
    return e4m3_scale(amax, dtype).reshape(())


def quantize_fp8(weight: Tensor, stats: LayerStats, config: QuantConfig) -> tuple[QuantizedTensor, dict[str, float]]:
    """FP8 E4M3 weight (out, in) per config.weight_scale (tensor | channel) [+ static input_scale]."""
    if weight.dim() != 2:
        raise InfqError(f"FP8 quantizes 2-D (out, in) weights; got shape {tuple(weight.shape)}")
    dtype = weight.dtype if weight.dtype in _SCALE_DTYPES else torch.float32  # scales stored in the model dtype
    w = weight.detach().to(torch.float32)  # (out, in)
    if not bool(torch.isfinite(w).all()):
        raise InfqError("weight contains NaN or inf, which FP8 cannot encode; repair the model or --skip this module")
    out, inp = w.shape
    if config.weight_scale == "tensor":
        amax = w.abs().amax().reshape(1, 1).expand(out, 1)  # (out, 1), one value
    else:
        amax = w.abs().amax(dim=1, keepdim=True)  # (out, 1)
    scale = e4m3_scale(amax, dtype).contiguous()  # (out, 1)
    codes = to_e4m3(w / scale)  # (out, in); w may be the caller's tensor, never divided in place
    info: dict[str, float] = {"weight_amax": float(amax.max())}
    act = None
    if config.act_scheme == "static":
        act = input_scale(stats, config, dtype)
        info["input_scale"] = float(act)
    qt = QuantizedTensor(
        codes=codes,
        scales=scale.to(dtype),  # exact: the scale is representable in dtype
        zeros=None,
        g_idx=torch.zeros(inp, dtype=torch.int32, device=w.device),
        scheme=QuantScheme(bits=8, group_size=-1, sym=True, kind="fp8"),
        shape=(out, inp),
        input_scale=act,
    )
    return qt, info
