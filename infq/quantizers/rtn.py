"""Round-to-nearest (RTN) min-max quantization, and the grid helpers GPTQ reuses.

`minmax_params` fits a scale and zero point per row of a group the way GPTQ's `Quantizer.find_params`
does (IST-DASLab `quant.py`; reference §A.1.3 / §B.1), `fake_quantize` is its `quantize()`
(round-half-even, clamp, dequantize), and `quantize_rtn` applies them per group to a whole weight
and returns a `QuantizedTensor`. Two deliberate differences from upstream, both so that what we
write is exactly what we computed:
  * scales are rounded UP to the nearest float16 before the codes are chosen, because every GPTQ
    reader stores fp16 scales; rounding up keeps the |w - dequant| <= scale/2 bound.
  * sym always uses the symmetric range [-amax, amax]; upstream keeps xmin = 0 for a group with no
    negative value, which clips everything above 7/15 of its max at 4 bits.
Vectorized over rows and groups; inputs are never mutated.
"""

from __future__ import annotations

import torch

from infq.errors import InfqError
from infq.quantizers.scheme import QuantConfig, QuantizedTensor, QuantScheme, check_group_size


def _ceil_to_fp16(scale: torch.Tensor) -> torch.Tensor:
    """Smallest float16 >= scale (returned as float32); scale > 0."""
    half = scale.to(torch.float16)
    up = torch.nextafter(half, torch.full_like(half, float("inf")))
    half = torch.where(half.to(torch.float32) < scale, up, half)
    tiny = torch.full_like(half, 2.0**-24)  # smallest fp16 subnormal, for a scale that is 0 in fp32
    return torch.where(half > 0, half, tiny).to(torch.float32)


def minmax_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row grid for x (..., n) -> (scale (...,), zero (...,)), both float32.

    As `Quantizer.find_params` (§A.1.3): the range always contains 0; an all-zero row uses
    [-1, 1]; sym: zero = 2^(bits-1); asym: zero = round(-xmin/scale). The scale is fp16-representable.
    """
    maxq = (1 << bits) - 1
    x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise InfqError("weight contains NaN or inf; fix or skip this module before quantizing")
    zero_t = torch.zeros((), dtype=torch.float32, device=x.device)
    xmin = torch.minimum(x.amin(dim=-1), zero_t)  # (...,)
    xmax = torch.maximum(x.amax(dim=-1), zero_t)  # (...,)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax  # upstream only does this where xmin < 0 (see module docstring)
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -1.0, xmin)
    xmax = torch.where(dead, 1.0, xmax)
    scale = _ceil_to_fp16((xmax - xmin) / maxq)  # (...,)
    if not bool(torch.isfinite(scale).all()):
        raise InfqError(
            "weight range overflows float16 scales (|w| > ~1e5 * 2^bits); rescale or skip this module"
        )
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)  # clamp is a no-op since scale >= exact
    return scale, zero


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
) -> torch.Tensor:
    """Integer codes clamp(round(w/scale) + zero, 0, maxq) as float32 (broadcasting)."""
    q = w.to(torch.float32) / scale  # the one new buffer; the rest happens in place
    return q.round_().add_(zero).clamp_(0, maxq)


def fake_quantize(
    weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, maxq: int
) -> torch.Tensor:
    """GPTQ's `quantize()`: scale * (clamp(round(w/scale) + zero, 0, maxq) - zero), float32.

    Shapes broadcast: e.g. weight (out, k) with scales/zeros (out, 1).
    """
    return scales * (quantize_codes(weight, scales, zeros, maxq) - zeros)


def quantize_rtn(weight: torch.Tensor, config: QuantConfig) -> QuantizedTensor:
    """Min-max RTN of weight (out, in) per `config` (bits, group_size, sym) -> QuantizedTensor."""
    if weight.dim() != 2:
        raise InfqError(f"RTN quantizes 2-D (out, in) weights; got shape {tuple(weight.shape)}")
    scheme = QuantScheme.from_config(config)
    out, inp = weight.shape
    n_groups = check_group_size(inp, config.group_size)
    gs = inp // n_groups
    w = weight.detach().to(torch.float32).reshape(out, n_groups, gs)  # (out, G, gs), a copy if cast
    scale, zero = minmax_params(w, config.bits, config.sym)  # (out, G) each
    codes = quantize_codes(w, scale[..., None], zero[..., None], scheme.maxq)  # (out, G, gs)
    g_idx = (torch.arange(inp, device=weight.device) // gs).to(torch.int32)  # (in,)
    return QuantizedTensor(
        codes=codes.reshape(out, inp).to(torch.uint8),
        scales=scale.to(torch.float16),  # exact: scale is fp16-representable
        zeros=zero.to(torch.int32),
        g_idx=g_idx,
        scheme=scheme,
        shape=(out, inp),
    )
