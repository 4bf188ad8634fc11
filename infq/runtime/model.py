"""One generic decoder (Llama / Mistral / Qwen2) driven by `arch.py`.

The model holds no hard-coded family: `ModelConfig` gives the sizes, `ArchSpec` the tensor names.
Weights come from a `WeightSource` (a checkpoint reader) that hands out plain tensors and linear
modules; quantized checkpoints give quantized linears behind the same call. Blocks are built on
demand: with `resident=True` every block is built once at load; with `resident=False` each block is
built from the (memory-mapped) source when the forward reaches it and dropped after, so a model
larger than RAM can still be scored. The calibration driver uses the same pieces (`embed`,
`load_block`, `rope`, `head`) to walk blocks one at a time. A simple contiguous `LayerCache` serves
single-stream generation (eval, calibration); the engine's paged KV cache comes in through the same
`Block.forward(h, cos, sin, cache)` call as a `PagedCache` layer (`forward_paged`).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infq.kernels import dispatch
from infq.runtime.arch import ModelConfig


class WeightSource(Protocol):
    def tensor(self, name: str) -> Tensor: ...  # plain tensor (embedding, norm, bias)

    def linear(self, module: str, dtype: torch.dtype, device: torch.device) -> nn.Module: ...

    def __contains__(self, name: str) -> bool: ...


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm computed in fp32 and cast back, as transformers does (`F.rms_norm` is one call for
    its x * rsqrt(mean(x²) + eps): the same values, bit for bit, in fewer dispatches)."""
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Neox rotary on x (…, heads, d) with `Rope`'s tables (…, d) (sin's first half negated):
    x cos + rotate_half(x) sin, where rotate_half(x) sin = roll(x, d/2) · (-sin₁, sin₂) exactly."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (…, 1, d): one row for every head
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class Rope:
    """Rotary embedding tables for positions, with default / linear / llama3 / dynamic scaling."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.inv_freq = _inv_freq(cfg, cfg.rope_theta)  # (head_dim/2,)
        self._on: dict[torch.device, Tensor] = {}  # inv_freq per device: no host copy per step (CUDA graphs)

    def __call__(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin of shape (B, T, head_dim) for integer positions (B, T), sin with its first half
        negated: what `rotate` takes (x cos + roll(x, d/2) sin, one pass for q and k)."""
        inv_freq = self.inv_freq
        cfg = self.cfg
        if cfg.rope_type == "dynamic":
            seq_len = int(positions.max()) + 1
            orig = int(cfg.rope.get("original_max_position_embeddings", cfg.max_position_embeddings))
            if seq_len > orig:
                factor = float(cfg.rope["factor"])
                d = cfg.head_dim
                base = cfg.rope_theta * ((factor * seq_len / orig) - (factor - 1)) ** (d / (d - 2))
                inv_freq = _inv_freq(cfg, base, scale=False)
        if inv_freq is self.inv_freq:
            if positions.device not in self._on:
                self._on[positions.device] = inv_freq.to(positions.device)
            inv_freq = self._on[positions.device]
        else:  # dynamic scaling's tables, made for this call
            inv_freq = inv_freq.to(positions.device)
        freqs = positions[..., None].float() * inv_freq  # (B, T, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d)
        sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)  # (B, T, d): rotate_half's sign folded in
        return emb.cos().to(dtype), sin.to(dtype)


def _inv_freq(cfg: ModelConfig, base: float, scale: bool = True) -> Tensor:
    d = cfg.head_dim
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # (d/2,)
    rope = cfg.rope
    if not scale:
        return inv
    if cfg.rope_type == "linear":
        return inv / float(rope["factor"])
    if cfg.rope_type == "llama3":
        factor = float(rope["factor"])
        lo, hi = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_len = float(rope["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(medium, smoothed, scaled)
    return inv


class PagedCache(Protocol):
    """One layer of the paged KV cache for one engine step (runtime.attention.PagedLayer)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, window: int | None) -> Tensor: ...


class LayerCache:
    """Contiguous per-layer K/V for one batch (the paged cache replaces it in the engine)."""

    def __init__(self) -> None:
        self.k: Tensor | None = None  # (B, Hkv, S, d)
        self.v: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


class Block(nn.Module):
    """One decoder block: pre-norm attention and SwiGLU MLP, each with a residual."""

    def __init__(self, cfg: ModelConfig, index: int, linears: dict[str, nn.Module], norms: dict[str, Tensor]) -> None:
        super().__init__()
        self.cfg = cfg
        self.index = index
        self.window = cfg.sliding_windows[index] if cfg.sliding_windows else None
        self.linears = nn.ModuleDict(linears)  # role -> linear (q k v o gate up down)
        self.input_norm = nn.Parameter(norms["input_norm"], requires_grad=False)
        self.post_norm = nn.Parameter(norms["post_norm"], requires_grad=False)
        # When set, the MLP runs this many tokens at a time: its (tokens, intermediate) transients
        # stay small (the calibration driver's statistics passes, next to a large Hessian).
        self.mlp_tokens: int | None = None
        # Serving only (`fuse_projections`): q/k/v and gate/up as one linear each, split after.
        self.fused = nn.ModuleDict()
        self.fused_sizes: dict[str, list[int]] = {}
        # Serving on CUDA in fp16/bf16 (`DecoderModel.use_fused_ops`): RMSNorm with the residual add,
        # rotary and SiLU-gate through kernels.fused, one kernel each (`forward_fused`).
        self.fused_ops = False

    def fuse_projections(self) -> list[str]:
        """Join q/k/v and gate/up into one linear each where their kernels allow (see
        `runtime.linear.fuse`), dropping the separate ones: fewer, longer kernel calls per token.
        For serving: per-linear hooks (the calibration driver's) no longer see q/k/v or gate/up.
        -> the groups fused."""
        from infq.runtime.linear import fuse

        done = []
        for group, roles in (("qkv", ("q", "k", "v")), ("gate_up", ("gate", "up"))):
            if group in self.fused or not all(r in self.linears for r in roles):
                continue
            joined = fuse([self.linears[r] for r in roles])
            if joined is None:
                continue
            self.fused[group] = joined
            self.fused_sizes[group] = [int(self.linears[r].out_features) for r in roles]
            for r in roles:
                del self.linears[r]
            done.append(group)
        return done

    def attention(self, x: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache | PagedCache | None = None) -> Tensor:
        cfg, lin = self.cfg, self.linears
        B, T, _ = x.shape
        H, Hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if "qkv" in self.fused and self.fused_ops and B == 1:  # one rotary kernel for q and k
            from infq.kernels import fused

            qkv = self.fused["qkv"](x)  # (1, T, (H + 2 Hkv) d)
            qk = fused.rotary_embedding(qkv[0, :, : (H + Hkv) * d].view(T, H + Hkv, d), cos[0], sin[0],
                                        sin_first_half_negated=True)[None]  # (1, T, H + Hkv, d)
            q, k = qk[:, :, :H], qk[:, :, H:]
            v = qkv[..., (H + Hkv) * d :].view(B, T, Hkv, d)
        elif "qkv" in self.fused:  # q and k side by side in one output: rotated in one pass
            qkv = self.fused["qkv"](x)  # (B, T, (H + 2 Hkv) d)
            qk = rotate(qkv[..., : (H + Hkv) * d].view(B, T, H + Hkv, d), cos, sin)
            q, k = qk[:, :, :H], qk[:, :, H:]  # (B, T, H, d), (B, T, Hkv, d)
            v = qkv[..., (H + Hkv) * d :].view(B, T, Hkv, d)
        else:
            q = rotate(lin["q"](x).view(B, T, H, d), cos, sin)
            k = rotate(lin["k"](x).view(B, T, Hkv, d), cos, sin)
            v = lin["v"](x).view(B, T, Hkv, d)
        if cache is not None and not isinstance(cache, LayerCache):
            # The paged path (runtime.attention.PagedLayer): B = 1, T = every token of the step.
            out = cache.attend(q[0], k[0], v[0], self.window)
            return lin["o"](out.reshape(B, T, H * d))  # (N, H, d) -> (1, N, C)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)  # (B, Hkv, past+T, d)
        rep = cfg.num_heads // cfg.num_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)  # (B, H, S, d)
            v = v.repeat_interleave(rep, dim=1)
        S = k.shape[2]
        if past == 0 and (self.window is None or T <= self.window):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, d)
        else:
            qpos = torch.arange(past, past + T, device=x.device)
            dist = qpos[:, None] - torch.arange(S, device=x.device)[None, :]  # (T, S) query - key
            mask = dist >= 0
            if self.window is not None:
                mask &= dist < self.window
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(B, T, cfg.num_heads * cfg.head_dim)
        return lin["o"](out)

    def mlp(self, x: Tensor) -> Tensor:
        lin = self.linears
        if torch.is_grad_enabled() and "gate_up" not in self.fused:
            return lin["down"](F.silu(lin["gate"](x)) * lin["up"](x))
        tokens = x.numel() // x.shape[-1]
        if self.mlp_tokens is None or tokens <= self.mlp_tokens:
            return self._mlp(x)
        flat = x.reshape(tokens, x.shape[-1])  # (N, C): the MLP is per token
        out = None
        for s in range(0, tokens, self.mlp_tokens):
            y = self._mlp(flat[s : s + self.mlp_tokens])  # (n, C)
            if out is None:
                out = y.new_empty(tokens, y.shape[-1])
            out[s : s + y.shape[0]] = y
        assert out is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    def _mlp(self, x: Tensor) -> Tensor:
        lin = self.linears
        if "gate_up" in self.fused:
            gate, up = self.fused["gate_up"](x).split(self.fused_sizes["gate_up"], -1)
            if self.fused_ops:
                from infq.kernels import fused

                return lin["down"](fused.silu_mul(gate, up))
            return lin["down"](F.silu(gate).mul_(up))
        g = F.silu(lin["gate"](x), inplace=True)  # (…, F) one buffer for the activation and the product
        return lin["down"](g.mul_(lin["up"](x)))

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache | PagedCache | None = None) -> Tensor:
        eps = self.cfg.rms_norm_eps
        h = h + self.attention(rms_norm(h, self.input_norm, eps), cos, sin, cache)
        return h + self.mlp(rms_norm(h, self.post_norm, eps))

    def forward_fused(self, x: Tensor, residual: Tensor | None, cos: Tensor, sin: Tensor,
                      cache: LayerCache | PagedCache | None = None) -> tuple[Tensor, Tensor]:
        """`forward` with each residual add folded into the next RMSNorm kernel (vLLM's layout):
        the block's input is x + residual (x alone when residual is None); returns the MLP output
        and the residual stream before it, whose sum is what `forward` returns."""
        from infq.kernels import fused

        eps = self.cfg.rms_norm_eps
        if residual is None:
            normed, residual = fused.rms_norm(x, self.input_norm, eps), x
        else:
            normed, residual = fused.rms_norm(x, self.input_norm, eps, residual=residual)
        a = self.attention(normed, cos, sin, cache)
        normed, residual = fused.rms_norm(a, self.post_norm, eps, residual=residual)
        return self.mlp(normed), residual


def build_block(cfg: ModelConfig, source: WeightSource, i: int, dtype: torch.dtype, device: torch.device) -> Block:
    """Block `i` with its weights read from `source` (memory-mapped where the format allows)."""
    arch = cfg.arch
    linears = {role: source.linear(arch.linear_name(i, role), dtype, device) for role in arch.linears}
    norms = {role: source.tensor(f"{arch.block(i)}.{name}").to(device, dtype) for role, name in arch.norms.items()}
    return Block(cfg, i, linears, norms)


class DecoderModel(nn.Module):
    """Embedding -> blocks -> final norm -> lm_head, over any `WeightSource`."""

    def __init__(
        self,
        cfg: ModelConfig,
        source: WeightSource,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        resident: bool = True,
    ) -> None:
        super().__init__()
        self.cfg, self.source, self.dtype = cfg, source, dtype
        self.device = torch.device(device)
        arch = cfg.arch
        self.embed_weight = self._param(arch.embed)  # (V, C)
        self.final_norm = self._param(arch.final_norm)  # (C,)
        tied = cfg.tie_word_embeddings
        self.lm_head = None if tied else source.linear(arch.lm_head.removesuffix(".weight"), dtype, self.device)
        self.rope = Rope(cfg)
        self.resident = resident
        self.fused_ops = False  # `use_fused_ops`
        self.blocks = nn.ModuleList([self.load_block(i) for i in range(cfg.num_layers)] if resident else [])

    def _param(self, name: str) -> nn.Parameter:
        t = self.source.tensor(name).to(self.device, self.dtype)
        return nn.Parameter(t, requires_grad=False)

    def fuse_projections(self) -> None:
        """Serving: fuse every resident block's q/k/v and gate/up linears (`Block.fuse_projections`)."""
        if self.resident:
            for block in self.blocks:
                block.fuse_projections()

    def use_fused_ops(self, on: bool = True) -> bool:
        """Serving in fp16/bf16 with resident blocks: the engine's steps (`forward_paged`) run
        RMSNorm (+ residual add), rotary and SiLU-gate as `kernels.fused` Triton kernels. Meant for
        CUDA (the loader turns it on there); the CPU tests run the kernels under the interpreter.
        -> whether it is on."""
        on = on and self.resident and self.dtype in (torch.float16, torch.bfloat16)
        if on:
            from infq.kernels import fused  # noqa: F401 (ImportError without Triton)
        self.fused_ops = on
        for block in self.blocks if self.resident else []:
            block.fused_ops = on
        return on

    def pack_weights(self) -> int:
        """Serving on a CPU, after `fuse_projections`: every resident dense linear (and dequantized-
        dense kernel, and an untied lm_head) moves its weight to oneDNN's blocked layout, reordered
        once here instead of at every call (`kernels.dispatch.onednn_pack`; bfloat16 and float32).
        A tied lm_head keeps the embedding's plain matrix. -> the number of linears packed."""
        mods = [m for b in (self.blocks if self.resident else []) for m in [*b.linears.values(), *b.fused.values()]]
        mods += [] if self.lm_head is None else [self.lm_head]
        return sum(bool(m.pack()) for m in mods if hasattr(m, "pack"))

    def load_block(self, i: int) -> Block:
        """Build block `i` from the weight source (used on demand when not resident)."""
        return build_block(self.cfg, self.source, i, self.dtype, self.device)

    def block(self, i: int) -> Block:
        return self.blocks[i] if self.resident else self.load_block(i)

    def embed(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids.to(self.device), self.embed_weight)  # (B, T, C)

    def positions(self, input_ids: Tensor, start: int = 0) -> Tensor:
        B, T = input_ids.shape
        return torch.arange(start, start + T, device=self.device).expand(B, T)  # (B, T)

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in range(self.cfg.num_layers)]

    def hidden(self, input_ids: Tensor, cache: list[LayerCache] | None = None) -> Tensor:
        """Final-normed hidden states (B, T, C) for token ids (B, T), after `cache` if given."""
        h = self.embed(input_ids)
        start = cache[0].length if cache else 0
        cos, sin = self.rope(self.positions(input_ids, start), self.dtype)
        for i in range(self.cfg.num_layers):
            h = self.block(i)(h, cos, sin, cache[i] if cache else None)
        return rms_norm(h, self.final_norm, self.cfg.rms_norm_eps)

    def head(self, h: Tensor) -> Tensor:
        """Logits (…, V) from final-normed hidden states (…, C)."""
        if self.lm_head is None:
            return dispatch.linear(h, self.embed_weight)
        return self.lm_head(h)

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, cache: list[LayerCache] | None = None) -> Tensor:
        return self.head(self.hidden(input_ids, cache))  # (B, T, V)

    @torch.inference_mode()
    def forward_paged(self, input_ids: Tensor, positions: Tensor, layers: list[PagedCache],
                      logit_rows: Tensor) -> Tensor:
        """One engine step over the flattened tokens of every scheduled request: input_ids and
        positions (N,), `layers[i]` the paged attention of layer i (runtime.attention.PagedLayer);
        returns logits (R, V) for the rows `logit_rows` (R,) only (the tokens to sample after)."""
        h = self.embed(input_ids[None])  # (1, N, C)
        cos, sin = self.rope(positions[None].to(self.device), self.dtype)  # (1, N, d)
        if self.fused_ops:
            from infq.kernels import fused

            residual = None
            for i in range(self.cfg.num_layers):
                h, residual = self.blocks[i].forward_fused(h, residual, cos, sin, layers[i])
            assert residual is not None
            out, _ = fused.rms_norm(h[0, logit_rows], self.final_norm, self.cfg.rms_norm_eps,
                                    residual=residual[0, logit_rows])  # (R, C)
            return self.head(out)  # (R, V)
        for i in range(self.cfg.num_layers):
            h = self.block(i)(h, cos, sin, layers[i])
        h = h[0, logit_rows]  # (R, C)
        return self.head(rms_norm(h, self.final_norm, self.cfg.rms_norm_eps))  # (R, V)
