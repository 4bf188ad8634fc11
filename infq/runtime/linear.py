"""Linear layers the runtime builds from checkpoint tensors.

`DenseLinear` is a plain `x @ W.T + b` over a full-precision weight. Quantized linears (GPTQ, AWQ,
FP8, GGUF blocks) join here behind the same call, choosing their kernel through
`kernels.dispatch`; the model never needs to know which one it holds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infq.kernels import dispatch
from infq.quantizers.scheme import QuantizedTensor


class DenseLinear(nn.Module):
    """A plain (out, in) weight. `pack()` (serving on a CPU) swaps it for oneDNN's blocked copy
    (`kernels.dispatch.onednn_pack`); the module then no longer has a `weight`."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (out, in)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # (out,)
        self.shape = tuple(weight.shape)
        self.packed: Tensor | None = None

    @property
    def impl(self) -> str:
        return "dense-onednn" if self.packed is not None else "dense"

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    def pack(self) -> bool:
        """Replace the weight by its oneDNN blocked copy where `onednn_pack` applies (small float32
        weights keep the plain one too, for few rows: `dispatch.keeps_plain`). -> whether it did."""
        if self.packed is None:
            self.packed = dispatch.onednn_pack(self.weight.detach())
            if self.packed is not None and not dispatch.keeps_plain(self.weight):
                del self.weight
        return self.packed is not None

    def forward(self, x: Tensor) -> Tensor:
        if dispatch.use_packed(x, self.packed, self._parameters.get("weight")):
            return dispatch.packed_linear(x, self.packed, self.bias)  # (..., out)
        b = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        if self.weight.dtype == x.dtype:
            return dispatch.linear(x, self.weight, b)  # (..., out)
        return linear_by_rows(x, lambda rows: self.weight[rows].to(x.dtype), self.out_features, b)


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
        return linear_by_rows(x, lambda rows: self.qt.dequantize(x.dtype, rows), self.out_features, b)


class QuantLinear(nn.Module):
    """A linear over a `QuantizedTensor` run by the kernel `kernels.dispatch` picks for (scheme,
    device, compute dtype), repacked once here: on CPU in bfloat16 PyTorch's packed int4/int8 mm,
    on CUDA the Triton dequant-GEMM, elsewhere the weight dequantized once to the compute dtype
    (exact in float32). `weight` is the reference decoding in float32, from `reread()` when given
    (the loader re-reads the checkpoint, so the codes need not stay resident) or from the kept qt."""

    def __init__(self, qt: QuantizedTensor, bias: Tensor | None, dtype: torch.dtype, device: torch.device | str,
                 reread: Callable[[], QuantizedTensor] | None = None) -> None:
        super().__init__()
        from infq.kernels import dispatch

        self.kernel = dispatch.prepare(qt, device, dtype)
        self.shape = qt.shape  # (out, in)
        self.qt = None if reread is not None else qt
        self._reread = reread
        self.bias = None if bias is None else nn.Parameter(bias.to(device, dtype), requires_grad=False)  # (out,)

    @property
    def impl(self) -> str:
        return self.kernel.name

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def weight(self) -> Tensor:
        qt = self.qt if self.qt is not None else self._reread()  # type: ignore[misc]
        return qt.dequantize(torch.float32)  # (out, in)

    def pack(self) -> bool:
        """Serving on a CPU: a dequantized-dense kernel moves to oneDNN's blocked layout."""
        return bool(getattr(self.kernel, "pack", lambda: False)())

    def forward(self, x: Tensor) -> Tensor:
        return self.kernel(x, self.bias)  # (..., out)


class FusedLinear(nn.Module):
    """Several linears over the same input as one kernel call; `sizes` split its output."""

    def __init__(self, kernel: Callable[..., Tensor], bias: Tensor | None, sizes: list[int], impl: str) -> None:
        super().__init__()
        self.kernel, self.sizes, self.impl = kernel, sizes, impl
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def pack(self) -> bool:
        if getattr(self.kernel, "pack", lambda: False)():
            self.impl = self.kernel.name  # type: ignore[attr-defined]
            return True
        return False

    def forward(self, x: Tensor) -> Tensor:
        return self.kernel(x, self.bias)  # (..., sum(sizes))


def fuse(linears: list[nn.Module]) -> nn.Module | None:
    """`linears` (same input) as one module whose output is theirs concatenated, or None where
    they cannot be fused: dense linears of one dtype (weights concatenated) or quantized linears
    whose kernels `kernels.dispatch.fuse_kernels` joins. Biases must be all present or all absent."""
    from infq.kernels import dispatch

    biases = [getattr(lin, "bias", None) for lin in linears]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases if b is not None])
    sizes = [int(lin.out_features) for lin in linears]
    if all(type(lin) is DenseLinear for lin in linears):
        if any(lin.packed is not None for lin in linears):  # fuse before packing
            return None
        weights = [lin.weight for lin in linears]
        if any(w.dtype != weights[0].dtype or w.device != weights[0].device for w in weights):
            return None
        return DenseLinear(torch.cat([w.detach() for w in weights]), bias)
    if all(type(lin) is QuantLinear for lin in linears):
        kernel = dispatch.fuse_kernels([lin.kernel for lin in linears])
        if kernel is None:
            return None
        return FusedLinear(kernel, bias, sizes, kernel.name)  # type: ignore[attr-defined]
    return None


ROW_CHUNK_BYTES = 4 << 20  # weight rows converted to the compute dtype per product


def linear_by_rows(x: Tensor, rows: Callable[[slice], Tensor], out_features: int, bias: Tensor | None) -> Tensor:
    """F.linear with the weight materialised in the compute dtype a slice of rows at a time
    (`rows(slice)` -> (r, in)): a converted or dequantized copy of the whole weight (46 MiB in
    float32 for a 2048 x 5632 MLP linear) never exists next to the activations."""
    in_features = x.shape[-1]
    step = max(1, ROW_CHUNK_BYTES // (x.element_size() * max(in_features, 1)))
    if step >= out_features:
        return F.linear(x, rows(slice(None)), bias)  # (..., out)
    y = x.new_empty(*x.shape[:-1], out_features)  # (..., out)
    for r in range(0, out_features, step):
        s = slice(r, min(r + step, out_features))
        y[..., s] = F.linear(x, rows(s), None if bias is None else bias[s])
    return y


def gguf_from(blocks: Callable[[], Tensor], qtype: str, shape: tuple[int, int], bias: Tensor | None,
              dtype: torch.dtype, device: torch.device) -> QuantLinear:
    """A QuantLinear over GGML blocks of type `qtype` and logical `shape` (out, in); `blocks()` returns
    them as uint8 (out, row_bytes) (from the memory-mapped file, so they need not stay resident).
    The kernel is `kernels.dispatch`'s choice for the GGUF scheme (Triton dequant-GEMM on CUDA,
    aten int4pack on CPU in bfloat16, the blocks decoded once otherwise)."""

    def read() -> QuantizedTensor:
        return QuantizedTensor.from_gguf(blocks(), qtype, shape)

    return QuantLinear(read(), bias, dtype, device, reread=read)


def dense_from(weight: Tensor, bias: Tensor | None, dtype: torch.dtype, device: torch.device) -> DenseLinear:
    b = None if bias is None else bias.to(device, dtype)
    return DenseLinear(weight.to(device, dtype), b)


class Fp8Linear(nn.Module):
    """A linear over FP8 E4M3 weights (a kind "fp8" QuantizedTensor): keeps the codes (1 byte per
    weight) and per-row scales, and quantizes activations per `act` (static / dynamic / none, see
    kernels/ref.py). On a CUDA GPU with FP8 tensor cores it runs `torch._scaled_mm` (untested on a
    GPU so far); elsewhere the dequantizing float32 reference computes the same product."""

    codes: Tensor  # buffers, registered in __init__
    w_scale: Tensor
    input_scale: Tensor | None

    def __init__(self, qt: QuantizedTensor, bias: Tensor | None, act: str, per_tensor: bool) -> None:
        super().__init__()
        from infq.kernels.ref import ACT_SCHEMES

        if qt.scheme.kind != "fp8" or act not in ACT_SCHEMES:
            raise ValueError(f"Fp8Linear needs an fp8 tensor and act in {ACT_SCHEMES}, got {qt.scheme.kind}, {act}")
        if act == "static" and qt.input_scale is None:
            raise ValueError("static activations need the tensor's input_scale")
        self.register_buffer("codes", qt.codes)  # (out, in) float8_e4m3fn
        self.register_buffer("w_scale", qt.scales.to(torch.float32))  # (out, 1)
        act_scale = qt.input_scale.to(torch.float32) if act == "static" and qt.input_scale is not None else None
        self.register_buffer("input_scale", act_scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # (out,)
        self.act, self.per_tensor = act, per_tensor
        self._decoded: Tensor | None = None  # float32 codes * scales, kept after the first CPU call

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def weight(self) -> Tensor:
        return self.codes.to(torch.float32) * self.w_scale  # (out, in) float32, exact

    def forward(self, x: Tensor) -> Tensor:
        from infq.kernels import dispatch
        from infq.kernels.ref import fp8_linear_ref

        tensor_wise = self.act == "static" and self.per_tensor
        if (self.act != "none" and dispatch.scaled_mm_supported(x.device)
                and dispatch.scaled_mm_shapes_ok(self.codes, x.dtype, tensor_wise)):
            return dispatch.fp8_linear_scaled_mm(x, self.codes, self.w_scale, self.bias, self.act, self.input_scale,
                                                 w_per_tensor=self.per_tensor)
        if x.device.type == "cpu":  # the fast CPU path: weights decoded once (exact), activations per call
            if self._decoded is None:
                self._decoded = self.weight
            return fp8_linear_ref(x, self.codes, self.w_scale, self.bias, self.act, self.input_scale,
                                  weight=self._decoded)
        return fp8_linear_ref(x, self.codes, self.w_scale, self.bias, self.act, self.input_scale)


def fp8_from(qt: QuantizedTensor, bias: Tensor | None, act: str, per_tensor: bool, dtype: torch.dtype,
             device: torch.device) -> Fp8Linear:
    """An Fp8Linear on `device`; the bias in the compute dtype, codes and scales as stored."""
    from dataclasses import replace

    b = None if bias is None else bias.to(device, dtype)
    act_scale = None if qt.input_scale is None else qt.input_scale.to(device)
    on_device = replace(qt, codes=qt.codes.to(device), scales=qt.scales.to(device), input_scale=act_scale)
    return Fp8Linear(on_device, b, act, per_tensor)
