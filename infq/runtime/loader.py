"""Open any checkpoint infq reads as a `DecoderModel` plus its tokenizer.

`load_model` resolves the path (local dir, hub id, `demo`), names its format
(`formats.detect`), checks that the tensors match the config, and builds the generic decoder over
a `WeightSource` for that format. This is the one place that turns checkpoint tensors into
runtime modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from infq.errors import InfqError
from infq.formats.detect import detect_format
from infq.formats.hf import Checkpoint, load_tokenizer, read_config, resolve_model
from infq.formats.packed import MARKERS, layout_from_config
from infq.runtime.arch import ModelConfig
from infq.runtime.linear import QuantLinear, dense_from, fp8_from, gguf_from
from infq.runtime.model import DecoderModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFWeights:
    """`WeightSource` over a full-precision checkpoint."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt

    def __contains__(self, name: str) -> bool:
        return name in self.ckpt

    def tensor(self, name: str) -> Tensor:
        return self.ckpt.get(name)

    def linear(self, module: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
        bias = self.ckpt.get(f"{module}.bias") if f"{module}.bias" in self.ckpt else None
        return dense_from(self.ckpt.get(f"{module}.weight"), bias, dtype, device)


class PackedWeights(HFWeights):
    """`WeightSource` over a packed checkpoint: integer linears become QuantLinears (repacked
    once for the kernel `kernels.dispatch` picks; in float32 on CPU the weight dequantized once,
    exact); FP8 linears keep their e4m3 codes and quantize activations as their config says (Fp8Linear).
    """

    FORMAT = ""  # a formats.packed.PACKED_FORMATS name, set by each subclass

    def __init__(self, ckpt: Checkpoint, quantization_config: dict[str, Any]) -> None:
        super().__init__(ckpt)
        self.layout = layout_from_config(self.FORMAT, quantization_config)

    def __contains__(self, name: str) -> bool:
        module = name.removesuffix(".weight")
        return name in self.ckpt or f"{module}.{self.layout.marker}" in self.ckpt

    def linear(self, module: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
        if f"{module}.{self.layout.marker}" not in self.ckpt:
            return super().linear(module, dtype, device)
        qt = self.layout.read(self.ckpt, module)
        bias = self.ckpt.get(f"{module}.bias") if f"{module}.bias" in self.ckpt else None
        if self.layout.is_fp8:
            c = self.layout.config
            return fp8_from(qt, bias, c.act_scheme, c.weight_scale == "tensor", dtype, device)
        return QuantLinear(qt, bias, dtype, device, reread=lambda: self.layout.read(self.ckpt, module))


class GPTQWeights(PackedWeights):
    """GPTQ (AutoGPTQ / GPTQModel, checkpoint_format gptq or gptq_v2)."""

    FORMAT = "gptq"


class AWQWeights(PackedWeights):
    """AWQ GEMM (AutoAWQ `WQLinear_GEMM`)."""

    FORMAT = "awq"


class CTWeights(PackedWeights):
    """compressed-tensors pack-quantized (llm-compressor W4A16 / W4A16_ASYM / W8A16) and
    float-quantized / naive-quantized FP8 (FP8, FP8_DYNAMIC, FP8 weight-only)."""

    FORMAT = "compressed-tensors"


class FP8Weights(PackedWeights):
    """vLLM's native fp8 layout (AutoFP8; per-tensor weight scales, static or dynamic activations)."""

    FORMAT = "fp8"


class GGUFWeights:
    """`WeightSource` over a llama GGUF file (infq's or llama.cpp's): F32/F16/BF16 tensors decoded,
    block-quantized linears a QuantLinear over their GGML blocks (kernel from kernels.dispatch); Q/K
    rows are already back in HF order (formats.gguf_reader)."""

    def __init__(self, gguf: Any) -> None:
        from infq.formats.gguf_reader import FLOAT_TYPES

        self.file, self.float_types = gguf, FLOAT_TYPES

    def __contains__(self, name: str) -> bool:
        return name in self.file

    def tensor(self, name: str) -> Tensor:
        return self.file.dense(name)

    def linear(self, module: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
        name = f"{module}.weight"
        bias = self.file.dense(f"{module}.bias") if f"{module}.bias" in self.file else None
        qtype = self.file.ggml_type(name)
        if qtype in self.float_types:
            return dense_from(self.file.dense(name), bias, dtype, device)
        out, inp = self.file.shape(name)
        return gguf_from(lambda: self.file.blocks(name), qtype, (out, inp), bias, dtype, device)


def check_gguf(gguf: Any, cfg: ModelConfig) -> None:
    """Every tensor the config implies is in the GGUF file with the implied shape."""
    for name, shape in expected_shapes(cfg).items():
        if name not in gguf:
            raise InfqError(f"{gguf.path}: tensor {name} (GGUF {_gguf_name(name)}) is missing; the file is incomplete")
        if gguf.shape(name) != shape:
            raise InfqError(f"{gguf.path}: tensor {name} has shape {gguf.shape(name)}, its metadata implies {shape}; "
                            "the file does not match its metadata")


def _gguf_name(name: str) -> str:
    from infq.formats.gguf import gguf_name

    return gguf_name(name)


def _load_gguf(path: Path, dtype: str, device: str, resident: bool, tokenizer: bool, serving: bool) -> LoadedModel:
    from infq.formats.gguf_reader import GGUFFile

    gguf = GGUFFile(path)
    cfg = ModelConfig.from_hf(gguf.config)
    check_gguf(gguf, cfg)
    dev = torch.device(device)
    blocks = any(t.tensor_type.name not in ("F32", "F16", "BF16") for t in gguf.reader.tensors)
    net = DecoderModel(cfg, GGUFWeights(gguf), dtype=resolve_dtype(dtype, dev, cfg, serving and blocks), device=dev,
                       resident=resident)
    if serving:
        _serving(net)
    eog = tuple(int(gguf.meta[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                if isinstance(gguf.meta.get(k), int) and gguf.meta[k] >= 0)
    return LoadedModel(net, gguf.tokenizer() if tokenizer else None, cfg, path, "gguf", eog)


def _serving(net: DecoderModel) -> None:
    """What a model that generates (rather than one that is scored or calibrated) gets at load."""
    net.fuse_projections()  # q/k/v and gate/up as one kernel call each
    net.pack_weights()  # bfloat16 and float32 dense weights on a CPU: oneDNN's layout, reordered once
    if net.device.type == "cuda":
        try:  # fp16/bf16: RMSNorm (+ residual), rotary, SiLU-gate as one Triton kernel each
            net.use_fused_ops()
        except ImportError:  # no Triton: the PyTorch expressions
            pass


SOURCES: tuple[type[PackedWeights], ...] = (GPTQWeights, AWQWeights, CTWeights, FP8Weights)


@dataclass
class LoadedModel:
    model: DecoderModel
    tokenizer: Any
    config: ModelConfig
    path: Path
    format: str
    # end-of-generation ids the config does not name (a GGUF's end-of-turn / end-of-message tokens)
    extra_eos_ids: tuple[int, ...] = ()


def resolve_dtype(dtype: str, device: torch.device, cfg: ModelConfig, int_packed: bool = False) -> torch.dtype:
    """`auto`: float32 on CPU (exact, and fast for dense weights), the checkpoint's half type on a
    GPU. `int_packed` (serving integer-coded weights on a CPU): bfloat16, because PyTorch's packed
    int4/int8 CPU kernels are 14-35x slower with float32 activations (kernels/dispatch.py)."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if int_packed else torch.float32
        return DTYPES.get(cfg.torch_dtype, torch.float16) if cfg.torch_dtype != "float32" else torch.float16
    if dtype not in DTYPES:
        raise InfqError(f"--dtype {dtype} is not supported; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    arch, C, d = cfg.arch, cfg.hidden_size, cfg.head_dim
    roles = {
        "q": (cfg.num_heads * d, C), "k": (cfg.num_kv_heads * d, C), "v": (cfg.num_kv_heads * d, C),
        "o": (C, cfg.num_heads * d), "gate": (cfg.intermediate_size, C),
        "up": (cfg.intermediate_size, C), "down": (C, cfg.intermediate_size),
    }
    shapes = {arch.embed: (cfg.vocab_size, C), arch.final_norm: (C,)}
    if not cfg.tie_word_embeddings:
        shapes[arch.lm_head] = (cfg.vocab_size, C)
    for i in range(cfg.num_layers):
        for role, shape in roles.items():
            shapes[f"{arch.linear_name(i, role)}.weight"] = shape
        for name in arch.norms.values():
            shapes[f"{arch.block(i)}.{name}"] = (C,)
    return shapes


def check_checkpoint(ckpt: Checkpoint, cfg: ModelConfig, quantized: bool = False) -> None:
    for name, shape in expected_shapes(cfg).items():
        module = name.removesuffix(".weight")
        if quantized and any(f"{module}.{marker}" in ckpt for marker in MARKERS):
            continue  # packed; its shapes are checked when it is unpacked
        if name not in ckpt:
            raise InfqError(f"{ckpt.dir}: tensor {name} is missing; the checkpoint does not match its config.json")
        if tuple(ckpt.shape(name)) != shape:
            raise InfqError(
                f"{ckpt.dir}: tensor {name} has shape {tuple(ckpt.shape(name))}, config.json implies {shape}; "
                "the checkpoint does not match its config"
            )


def load_model(
    model: str,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    resident: bool = True,
    tokenizer: bool = True,
    serving: bool = False,
) -> LoadedModel:
    """`serving` (generation, not scoring): `auto` picks bfloat16 on a CPU for integer-coded
    weights, which PyTorch's packed kernels run fast only in that dtype; eval keeps float32."""
    path = resolve_model(model)
    fmt = detect_format(path)
    if fmt == "gguf":
        return _load_gguf(path, dtype, device, resident, tokenizer, serving)
    packed = {cls.FORMAT: cls for cls in SOURCES}
    if fmt != "hf" and fmt not in packed:
        raise InfqError(f"{path}: reading {fmt} checkpoints is not available in this version of infq")
    hf_config = read_config(path)
    cfg = ModelConfig.from_hf(hf_config)
    ckpt = Checkpoint(path)
    source = HFWeights(ckpt) if fmt == "hf" else packed[fmt](ckpt, hf_config["quantization_config"])
    check_checkpoint(ckpt, cfg, quantized=fmt != "hf")
    dev = torch.device(device)
    int_packed = serving and (fmt in ("gptq", "awq") or (fmt == "compressed-tensors" and not _is_float_ct(hf_config)))
    net = DecoderModel(cfg, source, dtype=resolve_dtype(dtype, dev, cfg, int_packed), device=dev, resident=resident)
    if serving:
        _serving(net)
    tok = load_tokenizer(path) if tokenizer else None
    return LoadedModel(net, tok, cfg, path, fmt)


def _is_float_ct(hf_config: dict[str, Any]) -> bool:
    """A compressed-tensors config whose weights are FP8 (float-quantized / naive-quantized)."""
    fmt = str(hf_config.get("quantization_config", {}).get("format", ""))
    return fmt in ("float-quantized", "naive-quantized")
