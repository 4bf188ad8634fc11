"""AWQ (Lin et al., MLSys 2024): activation-aware scaling of salient input channels, then clipping.

Per decoder block, on the full-precision block and its calibration inputs (reference §B.2):
  1. `block_features`: one forward with observers on the inputs of every scaling pair's linears
     (q/k/v, o, gate/up, down), kept as (N, in) feature matrices; their per-channel abs-mean is
     AWQ's s_x (`LayerStats.absmean`, the shared observer).
  2. `search_scales`: for each pair that `runtime/arch.py` declares (input norm -> q/k/v; v -> o,
     skipped when the shapes differ under GQA; post-attention norm -> gate/up; up -> down), try
     s = s_x^α for α on a 20-point grid (llm-awq) and AutoAWQ's "duo" s = s_x^α / s_w^(1-α), each
     normalised by √(max·min); keep the s whose fake-quantized weights Q(W·s)/s give the smallest
     mean squared error of the inspected module's output (the whole attention, o_proj, the whole
     MLP, down_proj) against the full-precision output. α = 0 of the first family is s = 1, so the
     search never returns a worse block error than no scaling.
  3. `apply_scales`: fold 1/s into the preceding norm (or the preceding linear's output rows and
     bias) and s into the scaled linears' input columns: the full-precision function is unchanged.
  4. `search_clips` / `apply_clips`: for every linear but q and k, per (row, group), shrink the
     clipping range max|w| by up to 50 % (10 steps of 5 %) where that lowers the error of the
     group's partial dot products on ~512 sub-sampled tokens.
Searches return plain data (`PairScale`, clip tables); the apply functions return new tensors.
Nothing writes into a module: candidate weights are tried on fresh `Block` objects that share the
unchanged modules. The final codes are min-max RTN of the scaled, clipped weights
(`rtn.quantize_rtn`), asymmetric by default. The next block's inputs are the full-precision
block's outputs, as in llm-awq and AutoAWQ. Limits: dense (non-MoE) SwiGLU decoders only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from infq.quantizers.calibrate import LayerStats
from infq.quantizers.rtn import fake_quantize, minmax_params
from infq.quantizers.scheme import QuantConfig, check_group_size
from infq.runtime.arch import ScalePair
from infq.runtime.linear import DenseLinear
from infq.runtime.model import Block

GRID = 20  # α = 0, 1/20, ..., 19/20 (α = 1 is not tried, as upstream)
CLIP_STEPS = 10  # shrink max|w| by 0 %, 5 %, ..., 45 % (max_shrink 0.5 over a 20-point grid)
CLIP_TOKENS = 512  # tokens sub-sampled for the clip search
CLIP_ROWS = 256  # output rows per clip-search batch (bounds the (G, tokens, rows) error tensor)
SEARCH_TOKENS = 8192  # tokens on which the attention / MLP candidates run forward
FIRST = {"input_norm": "q", "post_norm": "gate"}  # a norm's output is the input of these linears
NO_CLIP = ("q", "k")  # upstream leaves query/key unclipped: clipping them distorts attention scores

Rope = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class PairScale:
    """The search's answer for one scaling pair: `prev` absorbs 1/scales, `linears` get ·scales."""

    prev: str
    linears: tuple[str, ...]
    scales: Tensor  # (in,) float32
    alpha: float
    duo: bool  # which family won: s_x^α / s_w^(1-α) (True) or s_x^α (False)
    loss_before: float  # inspected module's output MSE with s = 1 (plain fake quantization)
    loss_after: float  # with the chosen s


def fake_quant(w: Tensor, config: QuantConfig) -> Tensor:
    """Group-wise min-max fake quantization of w (out, in) as the final RTN does it."""
    out, n = w.shape
    gs = n // check_group_size(n, config.group_size)
    g = w.reshape(out, n // gs, gs)  # (out, G, gs)
    scale, zero = minmax_params(g, config.bits, config.sym)  # (out, G)
    return fake_quantize(g, scale[..., None], zero[..., None], (1 << config.bits) - 1).reshape(out, n)


def _input_role(pair: ScalePair) -> str:
    """The linear whose input is the pair's shared input (the first scaled linear)."""
    return pair.linears[0]


def active_pairs(block: Block, config: QuantConfig, names: Callable[[str], str]) -> list[ScalePair]:
    """The arch's scaling pairs that apply here: v -> o only when v's outputs are o's inputs (not
    under GQA), and no pair touching a skipped linear (its weight would change unquantized)."""
    lin = block.linears
    pairs = []
    for pair in block.cfg.arch.scale_pairs:
        roles = pair.linears + ((pair.prev,) if pair.prev in lin else ())
        if any(config.is_skipped(names(r)) for r in roles):
            continue
        if pair.prev in lin and lin[pair.prev].out_features != lin[pair.linears[0]].in_features:
            continue
        pairs.append(pair)
    return pairs


@torch.inference_mode()
def block_features(block: Block, h: Tensor, rope: Rope, batch: int, roles: tuple[str, ...]) -> dict[str, Tensor]:
    """Inputs (N, in) of the linears `roles` over the calibration inputs h (n, T, C), float32."""
    n, T, _ = h.shape
    feats = {r: torch.empty(n * T, block.linears[r].in_features, dtype=torch.float32, device=h.device) for r in roles}
    pos = {"s": 0}

    def hook(role: str):
        def record(_module, args):
            x = args[0]
            rows = x.shape[0] * x.shape[1]
            feats[role][pos["s"] : pos["s"] + rows] = x.reshape(rows, -1)
        return record

    handles = [block.linears[r].register_forward_pre_hook(hook(r)) for r in roles]
    cos, sin = rope
    try:
        for s in range(0, n, batch):
            b = min(batch, n - s)
            pos["s"] = s * T
            block(h[s : s + b].to(cos.dtype), cos[:b], sin[:b])
    finally:
        for handle in handles:
            handle.remove()
    return feats


def _variant(block: Block, weights: dict[str, Tensor]) -> Block:
    """A new Block sharing `block`'s modules except the linears whose weights are given."""
    lin = {r: (DenseLinear(weights[r], m.bias) if r in weights else m) for r, m in block.linears.items()}
    norms = {"input_norm": block.input_norm.data, "post_norm": block.post_norm.data}
    return Block(block.cfg, block.index, lin, norms)


def _inspect(block: Block, pair: ScalePair, x: Tensor, T: int, rope: Rope, batch: int) -> Callable[[dict[str, Tensor]], list[Tensor]]:
    """fn(weights) -> the inspected module's output, in chunks, on the pair's input x (N, in)."""
    cos, sin = rope
    rows = batch * T

    def run(weights: dict[str, Tensor]) -> list[Tensor]:
        blk = _variant(block, weights)
        outs = []
        for s in range(0, x.shape[0], rows):
            xc = x[s : s + rows]  # (rows, in)
            if pair.prev == "input_norm":  # the whole attention, rope and all
                b = xc.shape[0] // T
                outs.append(blk.attention(xc.view(b, T, -1), cos[:b], sin[:b]))
            else:  # the whole MLP
                outs.append(blk.mlp(xc))
        return outs

    return run


def _module_loss(block: Block, pair: ScalePair, x: Tensor, T: int, rope: Rope, batch: int) -> Callable[[dict[str, Tensor]], float]:
    """fn(trial weights) -> mean squared error of the inspected module's output vs full precision.

    A linear inspected alone (v -> o, up -> down) has output error X·ΔWᵀ, whose mean square is
    tr(ΔW XᵀX ΔWᵀ) / (N·out): computed exactly from XᵀX over all tokens, at the cost of one
    (out, in) x (in, in) product per candidate. The attention and the MLP are not linear in their
    weights, so they run forward, on at most SEARCH_TOKENS tokens (whole windows, evenly spaced).
    """
    if pair.prev not in FIRST:
        role = pair.linears[0]
        w = block.linears[role].weight.float()  # (out, in)
        gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        for s in range(0, x.shape[0], 4096):
            xc = x[s : s + 4096]
            gram += (xc.T @ xc).double()  # (in, in): float32 products per chunk, float64 sum
        gram = (gram / (x.shape[0] * w.shape[0])).float()

        def linear_loss(weights: dict[str, Tensor]) -> float:
            d = weights[role] - w  # (out, in)
            return float(((d @ gram) * d).sum(dtype=torch.float64))

        return linear_loss
    windows = x.shape[0] // T
    keep = max(1, min(windows, SEARCH_TOKENS // T))
    idx = torch.linspace(0, windows - 1, keep).round().long()
    xs = x.view(windows, T, -1)[idx].reshape(keep * T, -1)
    run = _inspect(block, pair, xs, T, rope, batch)
    reference = run({})

    def forward_loss(weights: dict[str, Tensor]) -> float:
        total = sum(float((o - r).pow(2).sum(dtype=torch.float64)) for o, r in zip(run(weights), reference, strict=True))
        return total / sum(r.numel() for r in reference)

    return forward_loss


def _w_mean(weights: list[Tensor], config: QuantConfig) -> Tensor:
    """AutoAWQ's s_w: |w| over its group's max, averaged over all output rows of the pair -> (in,)."""
    w = torch.cat(weights)  # (out_total, in)
    out, n = w.shape
    gs = n // check_group_size(n, config.group_size)
    g = w.abs().reshape(out, n // gs, gs)
    g = g / (g.amax(dim=-1, keepdim=True) + 1e-6)
    return g.reshape(out, n).mean(0)


def _candidates(x_mean: Tensor, w_mean: Tensor) -> list[tuple[float, bool, Tensor]]:
    """(α, duo, s) for both grid families; every s normalised by √(max·min), non-finite -> 1."""
    cands = []
    for duo in (False, True):
        for i in range(GRID):
            alpha = i / GRID
            s = x_mean.pow(alpha)
            if duo:
                s = s / (w_mean.pow(1 - alpha) + 1e-4)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
            cands.append((alpha, duo, s))
    return cands


@torch.inference_mode()
def search_pair(block: Block, pair: ScalePair, x: Tensor, x_mean: Tensor, T: int, rope: Rope, batch: int,
                config: QuantConfig) -> PairScale:
    """Best scales for one pair: the candidate with the least output MSE of the inspected module."""
    loss_of = _module_loss(block, pair, x, T, rope, batch)
    ws = {r: block.linears[r].weight.float() for r in pair.linears}
    best: tuple[float, float, bool, Tensor] | None = None
    before = float("nan")
    for alpha, duo, s in _candidates(x_mean, _w_mean(list(ws.values()), config)):
        trial = {r: fake_quant(w * s, config) / s for r, w in ws.items()}  # Q(W·diag(s))·diag(s)⁻¹
        loss = loss_of(trial)
        if alpha == 0 and not duo:
            before = loss  # s = 1: plain fake quantization
        if best is None or loss < best[0]:
            best = (loss, alpha, duo, s)
    assert best is not None
    loss, alpha, duo, s = best
    return PairScale(pair.prev, pair.linears, s, alpha, duo, before, loss)


def apply_scales(weights: dict[str, Tensor], biases: dict[str, Tensor | None], norms: dict[str, Tensor],
                 scales: list[PairScale]) -> tuple[dict[str, Tensor], dict[str, Tensor | None], dict[str, Tensor]]:
    """New (weights, biases, norms) by role with every pair's scales folded in; inputs untouched."""
    weights, biases, norms = dict(weights), dict(biases), dict(norms)
    for ps in scales:
        s = ps.scales
        if ps.prev in norms:
            norms[ps.prev] = norms[ps.prev] / s
        else:  # a linear: its output rows (and bias) absorb 1/s
            weights[ps.prev] = weights[ps.prev] / s[:, None]
            b = biases.get(ps.prev)
            biases[ps.prev] = None if b is None else b / s
        for role in ps.linears:
            weights[role] = weights[role] * s[None, :]
    return weights, biases, norms


@torch.inference_mode()
def search_clip(w: Tensor, x: Tensor, config: QuantConfig) -> Tensor:
    """Per (row, group) clipping bound for w (out, in) on inputs x (N, in) -> (out, G) float32."""
    out, n = w.shape
    G = check_group_size(n, config.group_size)
    gs = n // G
    step = max(1, x.shape[0] // CLIP_TOKENS)
    xg = x[::step][:CLIP_TOKENS].reshape(-1, G, gs).permute(1, 0, 2)  # (G, t, gs)
    bounds = []
    for r in range(0, out, CLIP_ROWS):
        wg = w[r : r + CLIP_ROWS].reshape(-1, G, gs)  # (o, G, gs)
        m0 = wg.abs().amax(dim=-1)  # (o, G)
        best_err = torch.full_like(m0, float("inf"))
        best_m = m0.clone()
        for i in range(CLIP_STEPS):
            m = m0 * (1 - i / (2 * CLIP_STEPS))  # 1.00, 0.95, ..., 0.55
            wc = torch.maximum(torch.minimum(wg, m[..., None]), -m[..., None])
            scale, zero = minmax_params(wc, config.bits, config.sym)  # (o, G)
            delta = fake_quantize(wc, scale[..., None], zero[..., None], (1 << config.bits) - 1) - wg
            err = torch.bmm(xg, delta.permute(1, 2, 0)).pow(2).mean(1).T  # (o, G): mean_t (Σ x·Δ)²
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_m = torch.where(better, m, best_m)
        bounds.append(best_m)
    return torch.cat(bounds)


def apply_clip(w: Tensor, bound: Tensor) -> Tensor:
    """w (out, in) clamped to [-bound, bound] per (row, group); bound (out, G)."""
    out, n = w.shape
    G = bound.shape[1]
    m = bound[..., None]  # (out, G, 1)
    return torch.maximum(torch.minimum(w.reshape(out, G, n // G), m), -m).reshape(out, n)


@dataclass
class AwqBlock:
    """What AWQ decided for one block and the tensors it produced from it."""

    scales: list[PairScale]
    clips: dict[str, Tensor]  # role -> (out, G) bound
    weights: dict[str, Tensor]  # role -> scaled, clipped weight (out, in) float32, ready for RTN
    biases: dict[str, Tensor | None]
    norms: dict[str, Tensor]  # norm role -> new weight
    info: dict[str, dict[str, float]]  # first linear of each pair -> alpha, duo, loss before/after


def awq_block(block: Block, h: Tensor, rope: Rope, batch: int, config: QuantConfig,
              names: Callable[[str], str]) -> AwqBlock:
    """Search scales and clips for `block` on inputs h (n, T, C) and apply them (see module doc)."""
    pairs = active_pairs(block, config, names)
    roles = tuple(dict.fromkeys(_input_role(p) for p in pairs))
    clip_roles = [r for r in block.linears if r not in NO_CLIP and not config.is_skipped(names(r))]
    input_of = {r: _input_role(p) for p in block.cfg.arch.scale_pairs for r in p.linears}
    feats = block_features(block, h, rope, batch, tuple(dict.fromkeys(roles + tuple(input_of[r] for r in clip_roles))))
    scales = []
    for pair in pairs:
        x = feats[_input_role(pair)]
        stats = LayerStats(x.shape[1])
        stats.add_batch(x, frozenset({"absmean"}))
        scales.append(search_pair(block, pair, x, stats.finish().absmean, h.shape[1], rope, batch, config))
    weights = {r: m.weight.float() for r, m in block.linears.items()}
    biases = {r: (None if m.bias is None else m.bias.float()) for r, m in block.linears.items()}
    norms = {"input_norm": block.input_norm.data.float(), "post_norm": block.post_norm.data.float()}
    weights, biases, norms = apply_scales(weights, biases, norms, scales)
    by_input = {ps.linears[0]: ps.scales for ps in scales}
    clips = {}
    for r in clip_roles:
        src = input_of[r]
        x = feats[src] if src not in by_input else feats[src] / by_input[src]  # inputs after scaling
        clips[r] = search_clip(weights[r], x, config)
        weights[r] = apply_clip(weights[r], clips[r])
    del feats
    info = {
        names(ps.linears[0]): {"alpha": ps.alpha, "duo": float(ps.duo), "loss_before": ps.loss_before,
                               "loss": ps.loss_after}
        for ps in scales
    }
    return AwqBlock(scales, clips, weights, biases, norms, info)


def output_error(block: Block, new: AwqBlock, h: Tensor, rope: Rope, batch: int, config: QuantConfig,
                 quantize: bool = True) -> float:
    """Mean squared error of the block's output on h with AWQ's tensors (fake-quantized when
    `quantize`) against the full-precision block: the figure the search is meant to lower."""
    weights = {r: (fake_quant(w, config) if quantize else w) for r, w in new.weights.items()}
    lin = {r: DenseLinear(weights[r], new.biases[r]) for r in weights}
    variant = Block(block.cfg, block.index, lin, new.norms)
    cos, sin = rope
    total, count = 0.0, 0
    for s in range(0, h.shape[0], batch):
        b = min(batch, h.shape[0] - s)
        x = h[s : s + b].to(cos.dtype)
        ref = block(x, cos[:b], sin[:b])
        got = variant(x, cos[:b], sin[:b])
        total += float((got - ref).double().pow(2).sum())
        count += ref.numel()
    return total / max(count, 1)
