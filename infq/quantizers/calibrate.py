"""The one layer-by-layer calibration driver every method shares.

`calibrate` walks the decoder blocks in order with ONE block's weights resident (built from the
memory-mapped checkpoint, dropped after). For each group of linears that share an input, in
true-sequential order (q/k/v, then o, then gate/up, then down), it runs the block over the
calibration activations with observers on that group's inputs, hands each linear's weight and
`LayerStats` to the method's pure function, and swaps the quantized (dequantized) weight into the
block so later groups and the next block see the quantization error, as GPTQ does. The quantized
block's outputs become the next block's inputs. Peak memory is one block plus the calibration
activations (two (nsamples, seqlen, hidden) tensors), not the model.
Methods that need no statistics (RTN) skip the forward passes entirely. Methods that rewrite a
whole block before quantizing it (AWQ: scales folded into norms and linears, clipping) give a
`transform`: it sees the full-precision block and its inputs and returns new full-precision
tensors; the driver quantizes the returned weights, keeps the other changed tensors (norms,
biases) in `BlockResult.dense`, and feeds the next block the full-precision block's outputs.
`collect_stats` walks the same blocks without quantizing anything: each block runs once at full
precision with observers on every linear group's input, which is how llama-imatrix computes the
K-quant importance matrix (on the unquantized model: the statistics never see quantization error).
"""

from __future__ import annotations

import ctypes
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from infq.errors import InfqError
from infq.quantizers.scheme import QuantConfig, QuantizedTensor
from infq.runtime.arch import ModelConfig
from infq.runtime.linear import DequantLinear
from infq.runtime.model import Block, Rope, WeightSource, build_block, rms_norm

# Which statistics each method's observers collect.
METHOD_STATS: dict[str, frozenset[str]] = {
    "rtn": frozenset(),
    "gptq": frozenset({"hessian"}),
    "awq": frozenset({"absmean"}),
    "fp8": frozenset({"amax", "token_amax"}),
    "kquant": frozenset({"sqmean"}),
}


@dataclass
class LayerStats:
    """Statistics of one linear's inputs over the calibration data (fp32 / fp64 accumulators)."""

    in_features: int
    tokens: int = 0
    hessian: Tensor | None = None  # (in, in) float32 = 2/n * sum x x^T, GPTQ's H
    absmean: Tensor | None = None  # (in,) mean |x|, AWQ's s_x
    sqmean: Tensor | None = None  # (in,) mean x^2, the importance matrix
    amax: Tensor | None = None  # () max |x|, FP8 static input scale
    token_amax: Tensor | None = None  # (tokens,) max |x| of every token, for a percentile amax (FP8)

    def add_batch(self, x: Tensor, need: frozenset[str]) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (n, in)
        n = x.shape[0]
        total = self.tokens + n
        if "hessian" in need:  # a sum here; finish() scales it to IST-DASLab's 2/n * X X^T
            if self.hessian is None:
                self.hessian = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self.hessian.addmm_(x.T, x)  # (in, in), accumulated in place
        if "absmean" in need:
            s = x.abs().sum(0).double()
            self.absmean = s if self.absmean is None else self.absmean + s
        if "sqmean" in need:
            s = x.pow(2).sum(0).double()
            self.sqmean = s if self.sqmean is None else self.sqmean + s
        if "amax" in need or "token_amax" in need:
            t = x.abs().amax(-1)  # (n,)
            m = t.max() if n else torch.zeros((), device=x.device)
            self.amax = m if self.amax is None else torch.maximum(self.amax, m)
            if "token_amax" in need:
                self.token_amax = t if self.token_amax is None else torch.cat([self.token_amax, t])
        self.tokens = total

    def finish(self) -> LayerStats:
        """Turn running sums into means."""
        if self.tokens and self.hessian is not None:
            self.hessian.mul_(2.0 / self.tokens)
        if self.tokens:
            if self.absmean is not None:
                self.absmean = (self.absmean / self.tokens).float()
            if self.sqmean is not None:
                self.sqmean = (self.sqmean / self.tokens).float()
        return self


QuantizeFn = Callable[[Tensor, LayerStats, QuantConfig], tuple[QuantizedTensor, dict[str, float]]]


@dataclass
class BlockResult:
    index: int
    tensors: dict[str, QuantizedTensor]  # full HF module name -> quantized weight
    info: dict[str, dict[str, float]] = field(default_factory=dict)  # per module: loss, damp, seconds
    seconds: float = 0.0
    dense: dict[str, Tensor] = field(default_factory=dict)  # full tensor name -> replaced full-precision tensor


class Transformed(Protocol):
    """A block rewritten by a method's transform, in full precision (see AWQ)."""

    weights: dict[str, Tensor]  # role -> weight (out, in) to quantize
    biases: dict[str, Tensor | None]  # role -> bias
    norms: dict[str, Tensor]  # norm role -> weight
    info: dict[str, dict[str, float]]  # full module name -> figures for the report


# (block, inputs (n, T, C), rope, windows per chunk, config, role -> module name) -> Transformed
TransformFn = Callable[["Block", Tensor, tuple[Tensor, Tensor], int, QuantConfig, Callable[[str], str]], Transformed]


@dataclass
class CalibrationContext:
    cfg: ModelConfig
    source: WeightSource
    config: QuantConfig
    quantize_fn: QuantizeFn
    dtype: torch.dtype = torch.float32  # compute dtype of the block forwards
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Storage dtype of block weights and calibration activations between blocks (the model's own
    # half type keeps peak memory near one fp16 block); None: the compute dtype.
    store_dtype: torch.dtype | None = None
    batch_tokens: int = 512  # tokens per forward chunk: bounds the MLP/attention transients
    on_linear: Callable[[int, str, dict[str, float]], None] | None = None
    transform: TransformFn | None = None  # block-level rewrite before quantization (AWQ)
    # Folder (on disk, next to the output) where the calibration activations wait while a group
    # with a Hessian of at least SPILL_HESSIAN_BYTES is solved; None: they stay in memory.
    spill_dir: Path | None = None
    # Statistics to collect; None: the method's own (METHOD_STATS). FP8 without static activation
    # scales passes an empty set: its weights quantize on their own, with no forward passes.
    stats: frozenset[str] | None = None


SPILL_HESSIAN_BYTES = 64 << 20  # in >= 4096: the MLP down projections of 1B+ models


def embed_windows(ctx: CalibrationContext, windows: Tensor) -> Tensor:
    """Block-0 inputs (n, T, C) for token windows (n, T), in the storage dtype."""
    table = ctx.source.tensor(ctx.cfg.arch.embed)  # (V, C)
    return torch.nn.functional.embedding(windows, table).to(ctx.device, ctx.store_dtype or ctx.dtype)


def _run(block: Block, h: Tensor, rope: tuple[Tensor, Tensor], batch: int, out: Tensor | None,
         on_chunk: Callable[[int], None] | None = None) -> None:
    """Run `block` over h (n, T, C) in chunks of `batch` windows (computed in the rope's dtype),
    into `out` when given (`out` may be h itself: windows are independent, so each chunk is
    overwritten only after it was read); a chunk whose forward an observer cut short (`_Stop`)
    simply ends there. `on_chunk(tokens)` is told each chunk's size before its forward."""
    cos, sin = rope
    for s in range(0, h.shape[0], batch):
        b = min(batch, h.shape[0] - s)
        if on_chunk is not None:
            on_chunk(b * h.shape[1])
        try:
            y = block(h[s : s + b].to(cos.dtype), cos[:b], sin[:b])
        except _Stop:
            continue
        if out is not None:
            out[s : s + b] = y


def _libc():  # glibc, or None elsewhere
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and the resident size of a
    block-by-block walk would grow with every block's transients)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


def map_large_allocations(threshold: int = 256 << 10) -> None:
    """Serve every allocation of `threshold` bytes (256 KiB) or more with its own mmap, returned to the OS
    when freed. glibc otherwise raises its mmap threshold each time a large block is freed (up
    to 32 MiB), after which the per-block transients (activation chunks, weight slices, GPTQ
    panels) are carved from the heap and fragment it: measured on a 1.1B model, ~50 MiB more
    resident per block walk. Setting the threshold explicitly turns that adjustment off."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, threshold)


class _Spilled:
    """A CPU tensor's bytes parked in an unnamed file in `directory` and its memory freed, until
    `restore()` reads them back into the same tensor. The calibration activations (32 MiB for a
    1.1B model at 16 x 512 tokens, GiBs at full calibration size) wait on disk this way while
    a large Hessian is factored and solved, so the two never add up in memory."""

    def __init__(self, t: Tensor, directory: Path) -> None:
        assert t.device.type == "cpu" and t.is_contiguous()
        self.t, self.storage = t, t.untyped_storage()
        self.nbytes = self.storage.nbytes()
        self.file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 (closed in restore)
        self.file.write(self._view())
        self.file.flush()
        self.storage.resize_(0)

    def _view(self) -> memoryview:
        return memoryview((ctypes.c_char * self.nbytes).from_address(self.storage.data_ptr())).cast("B")

    def restore(self) -> None:
        self.storage.resize_(self.nbytes)
        self.file.seek(0)
        got = self.file.readinto(self._view())
        self.file.close()
        if got != self.nbytes:
            raise InfqError(f"the calibration activations parked in {self.file.name} came back short; "
                            "check the free disk space next to --out")


class _Unloaded(torch.nn.Module):
    """Stands in for a linear whose weights were dropped while its inputs are observed: at the
    down_proj statistics pass of a 1.1B model that keeps 22 MiB of fp16 weights out of the
    peak, next to the 121 MiB Hessian."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: Tensor) -> Tensor:
        # Reached only inside a statistics pass when the MLP runs in token slices: the observer
        # stops the forward at the last slice, and what earlier slices compute after the
        # observed input never reaches a statistic (the block's output is discarded).
        return x.new_zeros(*x.shape[:-1], self.out_features)


# Tokens per MLP pass during statistics passes: the (tokens, intermediate) gate/up outputs stay at
# 2.75 MiB each for TinyLlama (11 MiB at a 512-token chunk) while the down_proj Hessian is resident.
OBSERVE_MLP_TOKENS = 128


class _Stop(Exception):
    """Raised by an observer once the group's input is seen: the rest of the block is not needed."""


def _observe(block: Block, roles: tuple[str, ...], need: frozenset[str], h: Tensor, rope, batch: int) -> dict[str, LayerStats]:
    """Statistics of the input shared by `roles`, from forwards cut short at the first of them
    once it has seen all of the chunk's tokens (the MLP runs OBSERVE_MLP_TOKENS at a time)."""
    stats = LayerStats(block.linears[roles[0]].in_features)
    left = [0]  # tokens of the current chunk the observed linear has not seen yet

    def start(tokens: int) -> None:
        left[0] = tokens

    def hook(_module, args):
        x = args[0]
        stats.add_batch(x, need)
        left[0] -= x.numel() // x.shape[-1]
        if left[0] <= 0:
            raise _Stop

    handle = block.linears[roles[0]].register_forward_pre_hook(hook)
    block.mlp_tokens = OBSERVE_MLP_TOKENS
    try:
        _run(block, h, rope, batch, None, on_chunk=start)
    finally:
        handle.remove()
        block.mlp_tokens = None
    stats.finish()
    return dict.fromkeys(roles, stats)  # one input, one set of statistics; methods never mutate it


def _replay(block: Block, result: BlockResult, device: torch.device) -> None:
    """Put an earlier run's quantized weights into `block` (resuming an interrupted run)."""
    arch = block.cfg.arch
    for role in arch.linears:
        qt = result.tensors.get(arch.linear_name(block.index, role))
        if qt is not None:
            block.linears[role] = _quantized(qt, block.linears[role].bias, device)


def _quantized(qt: QuantizedTensor, bias: Tensor | None, device: torch.device) -> torch.nn.Module:
    """The block's linear after quantization: codes kept, dequantized per forward (1 byte/weight)."""
    return DequantLinear(_to(qt, device), bias)


def _to(qt: QuantizedTensor, device: torch.device) -> QuantizedTensor:
    if qt.codes.device == device:
        return qt
    parts = {k: (None if getattr(qt, k) is None else getattr(qt, k).to(device)) for k in ("codes", "scales", "zeros", "g_idx")}
    return QuantizedTensor(**parts, scheme=qt.scheme, shape=qt.shape)


def calibrate(
    ctx: CalibrationContext, windows: Tensor | None, done: list[BlockResult] | None = None
) -> Iterator[BlockResult]:
    """Quantize block after block; yields each block's quantized tensors as soon as it is done.

    `windows` (n, T) are calibration token ids; None for methods that need no statistics.
    `done` holds the results of blocks 0..k-1 from an interrupted run: those blocks are rebuilt
    with their quantized weights and only run forward (to rebuild the activations), then
    quantization continues at block k exactly as the uninterrupted run would have.
    The work runs in inference mode, entered per block and left before each yield (not as a
    decorator on this generator: torch's generator wrapper keeps the last yielded value alive
    until the next one is ready, i.e. a block's codes resident through the next block).
    """
    done = done or []
    cfg, config = ctx.cfg, ctx.config
    need = METHOD_STATS[config.method] if ctx.stats is None else ctx.stats
    batch = max(1, ctx.batch_tokens // windows.shape[1]) if windows is not None else 1
    h = rope = None
    if need:
        assert windows is not None
        with torch.inference_mode():
            h = embed_windows(ctx, windows)  # (n, T, C), each block's outputs overwrite its inputs
            positions = torch.arange(windows.shape[1], device=ctx.device).expand(min(batch, len(windows)), -1)
            rope = Rope(cfg)(positions, ctx.dtype)  # (b, T, d) each
    for i in range(cfg.num_layers):
        result = _calibrate_block(ctx, i, done[i] if i < len(done) else None, need, h, rope, batch)
        if result is not None:
            yield result
        del result  # the caller has it (staged): do not hold a block's codes into the next block
    if config.lm_head and len(done) <= cfg.num_layers:
        with torch.inference_mode():
            head = _quantize_head(ctx, h, need, batch)
        yield head


def collect_stats(ctx: CalibrationContext, windows: Tensor) -> Iterator[tuple[int, dict[str, LayerStats]]]:
    """(block index, {full module name: LayerStats}) for every block, on the full-precision model.

    One forward per block: an observer on the first linear of each group (the group shares its
    input) accumulates that input's statistics (`ctx.stats`, else the method's METHOD_STATS) while
    the block's outputs overwrite its inputs for the next block. Nothing is quantized and no
    weight is changed, so later blocks see full-precision activations (llama-imatrix's imatrix).
    """
    cfg, arch = ctx.cfg, ctx.cfg.arch
    need = METHOD_STATS[ctx.config.method] if ctx.stats is None else ctx.stats
    batch = max(1, ctx.batch_tokens // windows.shape[1])
    with torch.inference_mode():
        h = embed_windows(ctx, windows)  # (n, T, C)
        positions = torch.arange(windows.shape[1], device=ctx.device).expand(min(batch, len(windows)), -1)
        rope = Rope(cfg)(positions, ctx.dtype)  # (b, T, d) each
    for i in range(cfg.num_layers):
        with torch.inference_mode():
            block = build_block(cfg, ctx.source, i, ctx.store_dtype or ctx.dtype, ctx.device)
            stats: dict[str, LayerStats] = {}
            handles = []
            for roles in arch.sequential:
                st = LayerStats(block.linears[roles[0]].in_features)
                stats.update({arch.linear_name(i, r): st for r in roles})

                def hook(_module, args, st=st):
                    st.add_batch(args[0], need)

                handles.append(block.linears[roles[0]].register_forward_pre_hook(hook))
            try:
                _run(block, h, rope, batch, h)  # full-precision outputs feed the next block
            finally:
                for handle in handles:
                    handle.remove()
            for st in {id(s): s for s in stats.values()}.values():
                st.finish()
            del block
        release_memory()
        yield i, stats


@torch.inference_mode()
def _calibrate_block(ctx: CalibrationContext, i: int, earlier: BlockResult | None, need: frozenset[str],
                     h: Tensor | None, rope: tuple[Tensor, Tensor] | None, batch: int) -> BlockResult | None:
    """Block i: quantized (its result), or, when `earlier` holds its result from an interrupted
    run, only run forward to rebuild the next block's inputs (None). `h` is overwritten with the
    block's outputs."""
    cfg, arch, config = ctx.cfg, ctx.cfg.arch, ctx.config
    start = time.perf_counter()
    block = build_block(cfg, ctx.source, i, ctx.store_dtype or ctx.dtype, ctx.device)
    if earlier is not None:
        if need:
            if ctx.transform is None:  # the next block saw the quantized block's outputs
                _replay(block, earlier, ctx.device)
            _run(block, h, rope, batch, h)
        return None
    if ctx.transform is not None:
        assert h is not None and rope is not None
        result = _transform_block(ctx, block, h, rope, batch)
        _run(block, h, rope, batch, h)  # full-precision outputs feed the next block
    else:
        result = BlockResult(i, {})
        for roles in arch.sequential:
            todo = tuple(r for r in roles if not config.is_skipped(arch.linear_name(i, r)))
            if todo:
                _quantize_group(ctx, block, todo, need, h, rope, batch, result)
        if need:
            _run(block, h, rope, batch, h)
    result.seconds = time.perf_counter() - start
    del block
    release_memory()
    return result


def _quantize_group(ctx: CalibrationContext, block: Block, todo: tuple[str, ...], need: frozenset[str],
                    h: Tensor | None, rope: tuple[Tensor, Tensor] | None, batch: int, result: BlockResult) -> None:
    """Observe the inputs of a group of linears that share them, quantize each, and put the
    quantized linears into the block. Its own frame: nothing of the group (weights, Hessian,
    codes) outlives it except what `block` and `result` hold."""
    i, arch = block.index, ctx.cfg.arch
    stats: dict[str, LayerStats] = {}
    if need:  # the group's own weights are not read by its observation: off for now
        shapes = {r: (block.linears[r].in_features, block.linears[r].out_features) for r in todo}
        for r in todo:
            block.linears[r] = _Unloaded(*shapes[r])
        release_memory()
        stats = _observe(block, todo, need, h, rope, batch)
        store = ctx.store_dtype or ctx.dtype
        for r in todo:  # read again from the checkpoint, next to the statistics
            block.linears[r] = ctx.source.linear(arch.linear_name(i, r), store, ctx.device)
    spill = None
    big = max((st.hessian.numel() * st.hessian.element_size() for st in stats.values() if st.hessian is not None),
              default=0)
    if h is not None and ctx.spill_dir is not None and big >= SPILL_HESSIAN_BYTES:
        spill = _Spilled(h, ctx.spill_dir)  # the solves do not read the activations
    release_memory()
    try:
        _solve_group(ctx, block, todo, need, stats, result)
    finally:
        stats.clear()  # the Hessians go before the activations come back
        if spill is not None:
            spill.restore()


def _solve_group(ctx: CalibrationContext, block: Block, todo: tuple[str, ...], need: frozenset[str],
                 stats: dict[str, LayerStats], result: BlockResult) -> None:
    """Quantize each linear of the group with its statistics; the block gets the quantized ones."""
    i, arch, config = block.index, ctx.cfg.arch, ctx.config
    for role in todo:
        name = arch.linear_name(i, role)
        lin = block.linears[role]
        t0 = time.perf_counter()
        st = stats.get(role) or LayerStats(lin.in_features)
        qt, info = ctx.quantize_fn(lin.weight.detach(), st, config)  # storage dtype; methods upcast
        info = {**info, "seconds": time.perf_counter() - t0}
        if need:  # later groups and the next block see the quantization error
            block.linears[role] = _quantized(qt, lin.bias, ctx.device)
        else:  # no forward follows: drop the weight now, keeping one linear's worth
            block.linears[role] = torch.nn.Identity()
        del lin
        result.tensors[name], result.info[name] = qt, info
        if ctx.on_linear is not None:
            ctx.on_linear(i, name, info)


def _transform_block(ctx: CalibrationContext, block: Block, h: Tensor, rope: tuple[Tensor, Tensor],
                     batch: int) -> BlockResult:
    """Rewrite the block with the method's transform, then quantize the rewritten weights."""
    i, arch, config = block.index, ctx.cfg.arch, ctx.config
    new = ctx.transform(block, h, rope, batch, config, lambda role: arch.linear_name(i, role))  # type: ignore[misc]
    result = BlockResult(i, {}, dict(new.info))
    for role, norm in new.norms.items():
        if not torch.equal(norm, getattr(block, role).data.float()):
            result.dense[f"{arch.block(i)}.{arch.norms[role]}"] = norm
    for role, lin in block.linears.items():
        name = arch.linear_name(i, role)
        bias = new.biases.get(role)
        if bias is not None and (lin.bias is None or not torch.equal(bias, lin.bias.float())):
            result.dense[f"{name}.bias"] = bias
        if config.is_skipped(name):
            continue
        t0 = time.perf_counter()
        qt, info = ctx.quantize_fn(new.weights[role], LayerStats(lin.in_features), config)
        info = {**result.info.get(name, {}), **info, "seconds": time.perf_counter() - t0}
        result.tensors[name], result.info[name] = qt, info
        if ctx.on_linear is not None:
            ctx.on_linear(i, name, info)
    return result


def _quantize_head(ctx: CalibrationContext, h: Tensor | None, need: frozenset[str], batch: int) -> BlockResult:
    """lm_head (asked for with QuantConfig.lm_head): its inputs are the final-normed hidden states."""
    cfg, start = ctx.cfg, time.perf_counter()
    weight = ctx.source.tensor(cfg.arch.lm_head).to(ctx.device, torch.float32)  # (V, C)
    stats = LayerStats(weight.shape[1])
    if need:
        assert h is not None
        norm = ctx.source.tensor(cfg.arch.final_norm).to(ctx.device, ctx.dtype)
        for s in range(0, h.shape[0], batch):
            stats.add_batch(rms_norm(h[s : s + batch].to(ctx.dtype), norm, cfg.rms_norm_eps), need)
        stats.finish()
    qt, info = ctx.quantize_fn(weight, stats, ctx.config)
    info = {**info, "seconds": time.perf_counter() - start}
    if ctx.on_linear is not None:
        ctx.on_linear(cfg.num_layers, "lm_head", info)
    return BlockResult(cfg.num_layers, {"lm_head": qt}, {"lm_head": info}, time.perf_counter() - start)
