"""The quantized linears of a packed checkpoint (GPTQ, AWQ, compressed-tensors, FP8) behind one interface.

A `PackedLayout` is a format plus its parsed `QuantConfig`: it names the tensor that marks a packed
linear (`qweight`, `weight_packed` for compressed-tensors, `weight_scale` for FP8 linears, whose
e4m3 `weight` sits under the usual name) and the tensors that make one up,
decodes one linear into a `QuantizedTensor`, encodes one back, and writes the format's
`quantization_config`. The byte-level rules stay in gptq.py, awq.py, compressed_tensors.py and fp8.py;
this module only wires them up once for the runtime loader, `infq inspect` and `infq convert`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from infq.errors import InfqError
from infq.formats import awq, compressed_tensors, fp8, gptq
from infq.quantizers.scheme import QuantConfig, QuantizedTensor

PACKED_FORMATS = ("gptq", "awq", "compressed-tensors", "fp8")
MARKERS = ("qweight", "weight_packed")  # a module holding one of these is a packed linear


class TensorStore(Protocol):
    """What a layout reads from: a checkpoint (formats.hf.Checkpoint) or a dict of tensors."""

    def __contains__(self, name: str) -> bool: ...

    def get(self, name: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class PackedLayout:
    """One packed format with its config. `checkpoint_format` is GPTQ's zero convention (v1/v2)."""

    format: str
    config: QuantConfig
    checkpoint_format: str = "gptq"

    def __post_init__(self) -> None:
        if self.format not in PACKED_FORMATS:
            raise InfqError(f"format {self.format!r} is not a packed format; use one of {', '.join(PACKED_FORMATS)}")
        if self.is_fp8 and self.format not in fp8.LAYOUTS:
            raise InfqError(f"FP8 weights are written as compressed-tensors (float-quantized) or fp8 (vLLM), "
                            f"not {self.format}; use --format compressed-tensors or --format fp8")
        if self.is_fp8 or self.format == "fp8":
            fp8.check_fp8_layout(self.config, self.format)

    @property
    def is_fp8(self) -> bool:
        return self.config.method == "fp8"

    @property
    def marker(self) -> str:
        if self.is_fp8:
            return fp8.MARKER
        return "weight_packed" if self.format == "compressed-tensors" else "qweight"

    @property
    def parts(self) -> tuple[str, ...]:
        """Tensor suffixes of one packed linear (a bias is a plain tensor, not a part)."""
        if self.is_fp8:
            return fp8.PARTS
        if self.format == "gptq":
            return ("qweight", "qzeros", "scales", "g_idx")
        if self.format == "awq":
            return ("qweight", "qzeros", "scales")
        return ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")

    def modules(self, names: Sequence[str]) -> list[str]:
        """Packed linears among tensor names, in their order."""
        suffix = "." + self.marker
        return [n.removesuffix(suffix) for n in names if n.endswith(suffix)]

    def read(self, store: TensorStore, module: str) -> QuantizedTensor:
        """Decode the packed linear `module` of `store`."""
        tensors = {p: store.get(f"{module}.{p}") for p in self.parts if f"{module}.{p}" in store}
        c = self.config
        if self.is_fp8:
            return fp8.fp8_to_quantized_tensor(tensors, c)
        if self.format == "gptq":
            return gptq.gptq_to_quantized_tensor(tensors, c.bits, c.group_size, c.sym, c.desc_act,
                                                 self.checkpoint_format)
        if self.format == "awq":
            return awq.awq_to_quantized_tensor(tensors, c.bits, c.group_size, c.sym)
        return compressed_tensors.ct_to_quantized_tensor(tensors, c.bits, c.group_size, c.sym)

    def encode(self, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The format's tensors (module-name suffixes) for one linear; see each format's writer."""
        if self.is_fp8:
            return fp8.quantized_tensor_to_fp8(qt, bias, self.config, self.format)
        if self.format == "gptq":
            return gptq.quantized_tensor_to_gptq(qt, bias, self.checkpoint_format)
        if self.format == "awq":
            return awq.quantized_tensor_to_awq(qt, bias)
        if qt.scheme.sym != self.config.sym:  # the config decides whether zero points are stored
            qt = replace(qt, scheme=replace(qt.scheme, sym=self.config.sym))
        group = compressed_tensors.ct_actorder(self.config) == "group"
        return compressed_tensors.quantized_tensor_to_ct(qt, bias, actorder_group=group)

    def quantization_config(self, unquantized: Sequence[str] | None = None) -> dict[str, Any]:
        """config.json's quantization_config. `unquantized`: full names of the linears left unpacked;
        AWQ lists them (its readers match names, not regexes) and needs them when config.skip is set."""
        if self.format == "gptq":
            return gptq.gptq_quantization_config(self.config, self.checkpoint_format)
        if self.format == "awq":
            return awq.awq_quantization_config(self.config, unquantized)
        if self.format == "fp8":
            return fp8.vllm_fp8_config(self.config, unquantized)
        return compressed_tensors.ct_quantization_config(self.config)

    @property
    def label(self) -> str:
        """Short name in scheme strings: gptq, awq, ct."""
        return "ct" if self.format == "compressed-tensors" else self.format

    def describe(self) -> str:
        """Scheme of its linears for `infq inspect`, e.g. 'gptq int4 g128 sym act-order', 'ct int8 gchannel sym'."""
        c = self.config
        if self.is_fp8:  # e.g. 'ct fp8 e4m3 w:channel a:dynamic'
            return f"{self.label} fp8 e4m3 w:{c.weight_scale} a:{c.act_scheme}"
        group = f"g{c.group_size}" if c.group_size > 0 else "gchannel"
        act = " act-order" if c.desc_act else ""
        return f"{self.label} int{c.bits} {group} {'sym' if c.sym else 'asym'}{act}"


def layout_from_config(fmt: str, quantization_config: Mapping[str, Any]) -> PackedLayout:
    """The layout of a checkpoint of format `fmt` (formats.detect) with this quantization_config."""
    if not isinstance(quantization_config, Mapping):
        raise InfqError("quantization_config in config.json is not an object; repair the config")
    if fmt == "gptq":
        config, checkpoint_format = gptq.parse_gptq_config(quantization_config)
        return PackedLayout("gptq", config, checkpoint_format)
    if fmt == "awq":
        return PackedLayout("awq", awq.parse_awq_config(quantization_config))
    if fmt == "compressed-tensors":
        return PackedLayout("compressed-tensors", compressed_tensors.parse_ct_config(quantization_config))
    if fmt == "fp8":
        return PackedLayout("fp8", fp8.parse_vllm_fp8_config(quantization_config))
    raise InfqError(f"{fmt} checkpoints have no packed integer linears; reading them is not available here")
