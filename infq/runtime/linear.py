"""Linear layers the runtime builds from checkpoint tensors.

`DenseLinear` is a plain `x @ W.T + b` over a full-precision weight. Quantized linears (GPTQ, AWQ,
FP8, GGUF blocks) join here behind the same call, choosing their kernel through
`kernels.dispatch`; the model never needs to know which one it holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infq.quantizers.scheme import QuantizedTensor


class DenseLinear(nn.Module):
    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (out, in)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # (out,)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)  # storage -> compute dtype
        b = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return F.linear(x, w, b)  # (..., out)


class DequantLinear(nn.Module):
    """A linear over a `QuantizedTensor`, dequantized at every call: holds codes (1 byte per
    weight) instead of a dense copy. The reference path (the calibration driver's quantized
    linears); fast kernels replace it in the runtime."""

    def __init__(self, qt: QuantizedTensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.qt = qt
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # (out,)

    @property
    def in_features(self) -> int:
        return self.qt.shape[1]

    @property
    def out_features(self) -> int:
        return self.qt.shape[0]

    @property
    def weight(self) -> Tensor:
        return self.qt.dequantize()  # (out, in) float32

    def forward(self, x: Tensor) -> Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.qt.dequantize(x.dtype), b)  # (..., out)


def dense_from(weight: Tensor, bias: Tensor | None, dtype: torch.dtype, device: torch.device) -> DenseLinear:
    b = None if bias is None else bias.to(device, dtype)
    return DenseLinear(weight.to(device, dtype), b)
