"""FP8 (E4M3FN) linear products: the dequantizing reference and the `torch._scaled_mm` path.

`Y = (X8 · W8ᵀ) · s_x · s_w (+ b)` (reference §B.3) with W8 `(N, K)` e4m3 codes and `s_w` `(N, 1)`
(per-channel, or one value repeated for per-tensor), and X8 the activations quantized with
  * "static":  one calibrated scale `s_x` for the whole tensor (saturating at ±448),
  * "dynamic": one scale per token (row), `max_j |x_tj| / 448`, computed at every call,
  * "none":    no activation quantization (weight-only; the weight is dequantized).
`fp8_linear_ref` computes exactly that product in float32 from the quantized values (the CPU path,
and the oracle); `fp8_linear_scaled_mm` hands the e4m3 operands to `torch._scaled_mm` (tensor-wise
scales, or row-wise scales with a bfloat16 output) where `scaled_mm_supported` says the device has
FP8 tensor cores (CUDA compute capability >= 8.9). A Triton kernel comes later; the scaled-mm path
is only exercised on CPU (where recent PyTorch also implements `_scaled_mm`) by the tests here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

E4M3_MAX = 448.0
ACT_SCHEMES = ("static", "dynamic", "none")
_TINY = torch.finfo(torch.float32).tiny  # scale of an all-zero token: its codes are 0 whatever it is


def to_e4m3(x: Tensor) -> Tensor:
    """Saturating cast to float8_e4m3fn (PyTorch's own cast saturates only on some builds/devices)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_act(x: Tensor, act: str, input_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """Activations (M, K) -> (e4m3 codes (M, K), float32 scale () for static or (M, 1) per token)."""
    x32 = x.to(torch.float32)  # (M, K)
    if act == "static":
        assert input_scale is not None
        s = input_scale.to(x.device, torch.float32).reshape(())
        return to_e4m3(x32 / s), s
    s = (x32.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(_TINY)  # (M, 1)
    return to_e4m3(x32 / s), s


def fp8_linear_ref(x: Tensor, codes: Tensor, w_scale: Tensor, bias: Tensor | None, act: str,
                   input_scale: Tensor | None = None, weight: Tensor | None = None) -> Tensor:
    """Reference FP8 linear in float32 from the quantized operands; returns x's dtype (..., N).
    `weight`: codes * w_scale in float32 computed earlier (the CPU runtime keeps it; exact)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # (M, K)
    if act == "none":
        xq = x2.to(torch.float32)
    else:
        x8, s = quantize_act(x2, act, input_scale)
        xq = x8.to(torch.float32) * s  # (M, K), exact in fp32
    w = weight if weight is not None else codes.to(torch.float32) * w_scale.to(torch.float32)  # (N, K)
    y = F.linear(xq, w, None if bias is None else bias.to(torch.float32))  # (M, N)
    return y.to(x.dtype).reshape(*shape[:-1], codes.shape[0])


def scaled_mm_supported(device: torch.device) -> bool:
    """FP8 tensor cores: CUDA with compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm_shapes_ok(codes: Tensor, dtype: torch.dtype, per_tensor: bool) -> bool:
    """cuBLASLt FP8 needs K and N multiples of 16; row-wise scales need a bfloat16 output."""
    n, k = codes.shape
    return n % 16 == 0 and k % 16 == 0 and (per_tensor or dtype == torch.bfloat16)


def fp8_linear_scaled_mm(x: Tensor, codes: Tensor, w_scale: Tensor, bias: Tensor | None, act: str,
                         input_scale: Tensor | None = None, w_per_tensor: bool = False) -> Tensor:
    """FP8 linear with `torch._scaled_mm` (act static or dynamic); callers check scaled_mm_shapes_ok."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # (M, K)
    m, n = x2.shape[0], codes.shape[0]
    x8, sx = quantize_act(x2, act, input_scale)  # (M, K), () or (M, 1)
    sw = w_scale.to(x.device, torch.float32)  # (N, 1)
    if act == "static" and w_per_tensor:  # tensor-wise: two scalars
        sa, sb = sx.reshape(()), sw[0, 0].reshape(())
    else:  # row-wise: (M, 1) and (1, N)
        sa, sb = sx.reshape(-1, 1).expand(m, 1).contiguous(), sw.reshape(1, n).contiguous()
    y = torch._scaled_mm(x8, codes.t(), scale_a=sa, scale_b=sb, out_dtype=x.dtype)  # (M, N); codes.t() is column-major
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*shape[:-1], n)
