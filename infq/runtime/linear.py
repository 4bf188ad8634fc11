"""Linear layers the runtime builds from checkpoint tensors.

`DenseLinear` is a plain `x @ W.T + b` over a full-precision weight. Quantized linears (GPTQ, AWQ,
FP8, GGUF blocks) join here behind the same call, choosing their kernel through
`kernels.dispatch`; the model never needs to know which one it holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
        return F.linear(x, self.weight, self.bias)  # (..., out)


def dense_from(weight: Tensor, bias: Tensor | None, dtype: torch.dtype, device: torch.device) -> DenseLinear:
    b = None if bias is None else bias.to(device, dtype)
    return DenseLinear(weight.to(device, dtype), b)
