"""Checkpoints in peer tools' layouts, built with plain Python integers straight from the spec.

The oracle for infq's AWQ and compressed-tensors readers: AutoAWQ GEMM tensors (reference §A.2:
nibble order [0,2,4,6,1,3,5,7] along the output dim, raw zeros) and llm-compressor pack-quantized
tensors (§A.3.5: signed codes + 2^(b-1), LSB-first along the input dim, zero points packed along
the output dim), each word assembled with Python ints, never with infq's packers; FP8 linears
(§A.3.2 / §A.3.4) from e4m3 bytes decoded by their bit fields in Python. Every builder
also returns the weights the tensors encode, computed from the integers and the scales' exact values.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # §A.2.3: nibble i of a word holds output column 8c + AWQ_ORDER[i]


def to_i32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


def _scales(rows: int, cols: int, dtype: torch.dtype, rng: random.Random) -> list[list[float]]:
    """Scales in `dtype`, as the exact Python floats that dtype holds."""
    t = torch.tensor([[rng.uniform(0.002, 0.05) for _ in range(cols)] for _ in range(rows)]).to(dtype)
    return t.tolist()


def awq_linear(out: int, inp: int, gs: int, rng: random.Random, zeros_half: bool = False):
    """AutoAWQ WQLinear_GEMM tensors for random codes / zeros / fp16 scales, and the weight (out, in)."""
    n_groups = inp // gs
    codes = [[rng.randint(0, 15) for _ in range(out)] for _ in range(inp)]  # [in][out]
    zeros = [[8 if zeros_half else rng.randint(0, 15) for _ in range(out)] for _ in range(n_groups)]
    if not zeros_half:
        zeros[0][0], zeros[-1][-1] = 0, 15  # the zero GPTQ v1 cannot store, and the largest
    scales = _scales(n_groups, out, torch.float16, rng)  # [G][out]

    def pack(row: list[int]) -> list[int]:
        words = []
        for c in range(len(row) // 8):
            word = 0
            for nibble in range(8):
                word |= row[8 * c + AWQ_ORDER[nibble]] << (4 * nibble)
            words.append(to_i32(word))
        return words

    tensors = {
        "qweight": torch.tensor([pack(codes[i]) for i in range(inp)], dtype=torch.int32),  # [in][out/8]
        "qzeros": torch.tensor([pack(zeros[g]) for g in range(n_groups)], dtype=torch.int32),
        "scales": torch.tensor(scales, dtype=torch.float16),
    }
    weight = [[(codes[i][o] - zeros[i // gs][o]) * scales[i // gs][o] for i in range(inp)] for o in range(out)]
    return tensors, torch.tensor(weight, dtype=torch.float32)


def ct_linear(out: int, inp: int, bits: int, gs: int, sym: bool, rng: random.Random, *,
              actorder: bool = False, scale_dtype: torch.dtype = torch.float16,
              shape_dtype: torch.dtype = torch.int64):
    """llm-compressor pack-quantized tensors (gs -1 = channel strategy), and the weight (out, in)."""
    half, pf = 1 << (bits - 1), 32 // bits
    size = inp if gs == -1 else gs
    n_groups = inp // size
    q = [[rng.randint(-half, half - 1) for _ in range(inp)] for _ in range(out)]  # signed codes [out][in]
    zp = [[0 if sym else rng.randint(-half, half - 1) for _ in range(n_groups)] for _ in range(out)]
    if not sym:
        zp[0][0], zp[-1][-1] = -half, half - 1
    g_idx = [i // size for i in range(inp)]
    if actorder:
        rng.shuffle(g_idx)
    scales = _scales(out, n_groups, scale_dtype, rng)  # [out][G]

    def pack(values: list[int]) -> list[int]:  # LSB-first, offset to unsigned, zero-padded
        words = []
        for k in range(-(-len(values) // pf)):
            word = 0
            for j, v in enumerate(values[k * pf:(k + 1) * pf]):
                word |= (v + half) << (bits * j)
            words.append(to_i32(word))
        return words

    zp_columns = [pack([zp[o][g] for o in range(out)]) for g in range(n_groups)]  # [G][ceil(out/pf)]
    tensors = {
        "weight_packed": torch.tensor([pack(row) for row in q], dtype=torch.int32),
        "weight_scale": torch.tensor(scales, dtype=scale_dtype),
        "weight_shape": torch.tensor([out, inp], dtype=shape_dtype),
    }
    if not sym:
        tensors["weight_zero_point"] = torch.tensor(zp_columns, dtype=torch.int32).T.contiguous()
    if actorder:
        tensors["weight_g_idx"] = torch.tensor(g_idx, dtype=torch.int32)
    weight = [[(q[o][i] - zp[o][g_idx[i]]) * scales[o][g_idx[i]] for i in range(inp)] for o in range(out)]
    return tensors, torch.tensor(weight, dtype=torch.float32)


def autoawq_config(gs: int) -> dict:
    """What AutoAWQ's save_quantized puts in config.json (§A.2.1)."""
    return {"quant_method": "awq", "zero_point": True, "group_size": gs, "bits": 4, "version": "gemm",
            "modules_to_not_convert": None}


def llmcompressor_config(bits: int, gs: int, sym: bool, actorder: str | None = None) -> dict:
    """What llm-compressor writes for W4A16 / W4A16_ASYM / W8A16 (§A.3.3), extra keys included."""
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "group_size": None if gs == -1 else gs,
               "strategy": "channel" if gs == -1 else "group", "block_structure": None, "dynamic": False,
               "actorder": actorder, "observer": "minmax", "observer_kwargs": {}}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": None,
             "output_activations": None, "format": "pack-quantized"}
    return {"config_groups": {"group_0": group}, "format": "pack-quantized", "global_compression_ratio": None,
            "ignore": ["lm_head"], "kv_cache_scheme": None, "quant_method": "compressed-tensors",
            "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
            "version": "0.10.2"}


def build_checkpoint(src: Path, out: Path, linear: Callable[[int, int], tuple[dict, torch.Tensor]],
                     quantization_config: dict) -> dict[str, torch.Tensor]:
    """Copy the HF model at `src` to `out` with every *_proj linear replaced by `linear(out, in)`'s
    tensors; returns {module: the weight it encodes}."""
    state = load_file(str(src / "model.safetensors"))
    out.mkdir(parents=True)
    tensors, expected = {}, {}
    for name in list(state):
        if name.endswith("_proj.weight"):
            module = name.removesuffix(".weight")
            rows, cols = state.pop(name).shape
            parts, expected[module] = linear(rows, cols)
            tensors.update({f"{module}.{k}": v for k, v in parts.items()})
    tensors.update(state)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            shutil.copy(f, out / f.name)
    return expected


def e4m3_value(byte: int) -> float:
    """The value of one float8_e4m3fn byte from its bits (§A.3.1): bias 7, no inf, NaN = S.1111.111."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 0xF, byte & 0x7
    if exp == 15 and man == 7:
        return float("nan")
    if exp == 0:
        return sign * man / 8 * 2.0**-6  # subnormal
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def fp8_linear(out: int, inp: int, strategy: str, static: bool, rng: random.Random, *,
               scale_dtype: torch.dtype = torch.bfloat16, layout: str = "compressed-tensors"):
    """An FP8 linear as llm-compressor (float-quantized: scales in the model dtype, [1] or [out, 1],
    input_scale [1]) or AutoFP8 (layout "fp8": F32 scalars) writes it, from random e4m3 bytes;
    returns (tensors, weight (out, in), input_scale as a float or None)."""
    codes = [[rng.choice([b for b in range(256) if b not in (0x7F, 0xFF)]) for _ in range(inp)] for _ in range(out)]
    codes[0][0], codes[-1][-1] = 0x7E, 0xFE  # +448 and -448
    rows = 1 if strategy == "tensor" else out
    scales = _scales(rows, 1, scale_dtype, rng)  # [rows][1]
    act = _scales(1, 1, scale_dtype, rng)[0][0] if static else None
    weight_u8 = torch.tensor(codes, dtype=torch.uint8)
    tensors = {"weight": weight_u8.view(torch.float8_e4m3fn)}
    if layout == "fp8":
        tensors["weight_scale"] = torch.tensor(scales[0][0], dtype=torch.float32)  # shape []
        if static:
            tensors["input_scale"] = torch.tensor(act, dtype=torch.float32)
    else:
        shape = [1] if strategy == "tensor" else [out, 1]
        tensors["weight_scale"] = torch.tensor(scales, dtype=scale_dtype).reshape(shape)
        if static:
            tensors["input_scale"] = torch.tensor([act], dtype=scale_dtype)
    weight = [[e4m3_value(codes[o][i]) * scales[o if rows > 1 else 0][0] for i in range(inp)] for o in range(out)]
    return tensors, torch.tensor(weight, dtype=torch.float32), act


def llmcompressor_fp8_config(strategy: str, act: str) -> dict:
    """llm-compressor's FP8 (tensor, static) / FP8_DYNAMIC (channel, token dynamic) / weight-only
    configs as compressed-tensors 0.19 serialises them (scale_dtype / zp_dtype keys included)."""
    base = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "block_structure": None,
            "actorder": None, "scale_dtype": None, "zp_dtype": None, "observer_kwargs": {}}
    weights = {**base, "strategy": strategy, "dynamic": False, "observer": "minmax"}
    acts = None
    if act == "static":
        acts = {**base, "strategy": "tensor", "dynamic": False, "observer": "static_minmax"}
    elif act == "dynamic":
        acts = {**base, "strategy": "token", "dynamic": True, "observer": None}
    fmt = "naive-quantized" if acts is None else "float-quantized"
    group = {"targets": ["Linear"], "weights": weights, "input_activations": acts, "output_activations": None,
             "format": fmt}
    return {"config_groups": {"group_0": group}, "format": fmt, "global_compression_ratio": None,
            "ignore": ["lm_head"], "kv_cache_scheme": None, "quant_method": "compressed-tensors",
            "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
            "version": "0.12.2"}


def autofp8_config(static: bool) -> dict:
    """What AutoFP8's save_quantized writes (§A.3.2)."""
    return {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic",
            "ignored_layers": ["lm_head"]}
