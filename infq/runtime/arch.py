"""Architectures as data: what the generic decoder and the calibration driver need to know.

`ArchSpec` says where a family keeps its decoder blocks, which linears each block holds, which
linears share an input (quantized together), which norm or linear feeds which linears (AWQ's
scaling pairs) and which ones carry a bias. `ModelConfig` is the frozen, validated subset of a
Hugging Face config.json that the runtime uses, read from the raw JSON so configs written by
transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x (`rope_parameters`) both work. Llama 1/2/3
(incl. Llama-3 and linear rope scaling), Mistral (sliding window) and Qwen2 (qkv bias) share one
layout; adding a family means adding one `ArchSpec` entry, not code in the algorithms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infq.errors import InfqError

# Short role names used throughout infq -> HF module path inside a block.
LLAMA_LINEARS: dict[str, str] = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


@dataclass(frozen=True)
class ScalePair:
    """AWQ: `prev` (a norm or linear role) feeds `linears`; scales fold into `prev`."""

    prev: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    name: str
    block_prefix: str  # format with the block index
    linears: dict[str, str]  # role -> module path within a block
    # Groups of roles that read the same input, in true-sequential order.
    sequential: tuple[tuple[str, ...], ...]
    norms: dict[str, str]  # role -> weight name within a block
    scale_pairs: tuple[ScalePair, ...]
    embed: str
    final_norm: str
    lm_head: str
    bias_roles: tuple[str, ...] = ()

    def block(self, i: int) -> str:
        return self.block_prefix.format(i)

    def linear_name(self, i: int, role: str) -> str:
        """Full HF module name of a block's linear, e.g. model.layers.3.self_attn.q_proj."""
        return f"{self.block(i)}.{self.linears[role]}"


_LLAMA = ArchSpec(
    name="llama",
    block_prefix="model.layers.{}",
    linears=LLAMA_LINEARS,
    sequential=(("q", "k", "v"), ("o",), ("gate", "up"), ("down",)),
    norms={"input_norm": "input_layernorm.weight", "post_norm": "post_attention_layernorm.weight"},
    scale_pairs=(
        ScalePair("input_norm", ("q", "k", "v")),
        ScalePair("v", ("o",)),
        ScalePair("post_norm", ("gate", "up")),
        ScalePair("up", ("down",)),
    ),
    embed="model.embed_tokens.weight",
    final_norm="model.norm.weight",
    lm_head="lm_head.weight",
)
ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": ArchSpec(**{**_LLAMA.__dict__, "name": "qwen2", "bias_roles": ("q", "k", "v")}),
}
HF_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted items of the scaling dict
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full attention
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise InfqError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads "
                f"{self.num_kv_heads}; fix config.json"
            )
        if self.rope_type not in ROPE_TYPES:
            raise InfqError(
                f"rope scaling {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            )

    @property
    def arch(self) -> ArchSpec:
        return ARCHS[self.model_type]

    @property
    def rope_type(self) -> str:
        return str(dict(self.rope_scaling).get("rope_type", "default"))

    @property
    def rope(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Validate and read a config.json dict; unsupported families get a one-line error."""
        model_type = cfg.get("model_type")
        text = cfg.get("text_config")
        if model_type not in ARCHS and isinstance(text, dict):
            cfg, model_type = text, text.get("model_type")
        if model_type not in ARCHS:
            raise InfqError(
                f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ARCHS))}"
            )
        try:
            return _read(model_type, cfg)
        except (KeyError, TypeError, ValueError) as e:
            raise InfqError(f"config.json lacks or garbles {e}; repair it") from None


def _read(model_type: str, cfg: dict[str, Any]) -> ModelConfig:
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    layers = int(cfg["num_hidden_layers"])
    rope: dict[str, Any] = dict(cfg.get("rope_parameters") or {})
    theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    if cfg.get("rope_scaling"):
        rope.update(cfg["rope_scaling"])
    if "type" in rope and "rope_type" not in rope:  # transformers 4.3x spelling
        rope["rope_type"] = rope.pop("type")
    rope.setdefault("rope_type", "default")
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_scaling=tuple(sorted(rope.items())),
        sliding_windows=_sliding_windows(model_type, cfg, layers),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=tuple(cfg["eos_token_id"])
        if isinstance(cfg.get("eos_token_id"), list)
        else cfg.get("eos_token_id"),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
    )


def _sliding_windows(model_type: str, cfg: dict[str, Any], layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if model_type == "llama" or not window:
        return (None,) * layers
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        return tuple(int(window) if t == "sliding_attention" else None for t in types)
    if model_type == "qwen2":  # Qwen2: only with use_sliding_window, from max_window_layers on
        if not cfg.get("use_sliding_window", False):
            return (None,) * layers
        start = int(cfg.get("max_window_layers", layers))
        return tuple(int(window) if i >= start else None for i in range(layers))
    return (int(window),) * layers
