"""Decode steps through static buffers, replayed as CUDA graphs.

A small-batch decode step launches a few hundred small kernels; called from Python each launch
costs tens of microseconds, so the step is bound by launches, not by the GPU (README: one eager
dequant-GEMM call costs 50-170 us at M = 1 against 9-28 us of GPU time). vLLM and gpt-fast capture
decode steps once as CUDA graphs and replay them; `DecodeGraphs` does the same for the engine's pure
decode steps (every request one new token, no drafts).

A graph replays fixed addresses and shapes, so a step's inputs are copied into static buffers sized
for a bucket of batch sizes (1, 2, 4, then multiples of 8 up to `max_batch`) and the block tables
are as wide as the context allows (a step rewrites only the columns its longest table reaches).
The rows past the batch are padding: token 0 at position 0, writing its K/V into a scratch block
that the block pool never hands out (the engine allocates the cache one block larger), attending
to that one slot. Rows are independent in every op of a decoder
step, so padding cannot change the real rows' logits.

With `capture=False` (any device; the CPU tests) the same buffers and padding run eagerly: the tests
check that path against the engine's plain one, and the GPU test checks the captured graphs.
Capture is lazy, on the first step of each bucket: two eager warm-up passes on a side stream first
(the Triton autotuners time their configs for these shapes there, never inside a capture), then
the capture into one memory pool that every bucket shares. The warm-up and capture passes rewrite
the step's own K/V with the same values, so they change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from infq.runtime.attention import PagedBatch, PagedLayer


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to max_batch (which is always the last)."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch, 8))
    return [*sizes, max_batch]


class DecodeGraphs:
    def __init__(self, model: Any, kv: Any, backend: Any, block_size: int, max_model_len: int, max_batch: int,
                 scratch_block: int, capture: bool) -> None:
        if model.cfg.rope_type == "dynamic":
            raise ValueError("dynamic rope scaling reads the longest position on the host; no decode graphs")
        self.model, self.kv, self.backend, self.block_size = model, kv, backend, block_size
        self.sizes = bucket_sizes(max_batch)
        self.max_batch, self.scratch, self.capture = max_batch, scratch_block, capture
        self.width = -(-max_model_len // block_size)  # block-table columns: a whole context
        dev = model.device
        b = max_batch
        self.ints = torch.zeros(4, b, dtype=torch.int64, device=dev)  # ids, positions, slots, seq lens
        self.tables = torch.full((b, self.width), -1, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(b, dtype=torch.int32, device=dev)
        self.rows = torch.arange(b, device=dev)
        self.cu = torch.arange(b + 1, dtype=torch.int32, device=dev)
        self.empty_long = torch.zeros(0, dtype=torch.int64, device=dev)
        self.graphs: dict[int, tuple[Any, Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.pinned = capture and dev.type == "cuda"
        self.calls = 0  # steps run (replays on CUDA)

    def size_for(self, batch: int) -> int | None:
        """The bucket a batch of `batch` decode rows runs in; None when over max_batch."""
        return next((s for s in self.sizes if s >= batch), None)

    def _batch(self, size: int) -> PagedBatch:
        """The attention metadata of a padded decode step of `size` rows, views of the buffers."""
        return PagedBatch(self.ints[2, :size], self.tables[:size], self.seq_lens[:size], [1] * size, [],
                          self.cu[:size + 1], self.rows[:size], self.rows[:size], self.width * self.block_size,
                          [], self.empty_long, self.empty_long, self.cu[:1], self.cu[:1])

    def _forward(self, size: int) -> Tensor:
        batch = self._batch(size)
        layers = [PagedLayer(self.backend, self.kv, i, batch) for i in range(self.model.cfg.num_layers)]
        return self.model.forward_paged(self.ints[0, :size], self.ints[1, :size], layers, self.rows[:size])

    def _fill(self, size: int, ids: Sequence[int], positions: Sequence[int], tables: Sequence[list[int]]) -> None:
        """Copy a step's rows into the buffers, rows len(ids)..size as padding."""
        bs, pad = self.block_size, size - len(ids)
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)]
        lens = [p + 1 for p in positions]
        ints = torch.tensor([[*ids, *[0] * pad], [*positions, *[0] * pad], [*slots, *[self.scratch * bs] * pad],
                             [*lens, *[1] * pad]], dtype=torch.int64, pin_memory=self.pinned)
        # Only the columns this step's longest table reaches: the attention never reads a table entry
        # at or past its row's length, so older entries further right may stay.
        cols = max(len(t) for t in tables)
        rows = [t + [-1] * (cols - len(t)) for t in tables] + [[self.scratch] + [-1] * (cols - 1)] * pad
        tab = torch.tensor(rows, dtype=torch.int32, pin_memory=self.pinned)
        self.ints[:, :size].copy_(ints, non_blocking=self.pinned)
        self.tables[:size, :cols].copy_(tab, non_blocking=self.pinned)
        self.seq_lens[:size].copy_(self.ints[3, :size])  # int64 -> int32 on the device

    def _capture(self, size: int) -> tuple[Any, Tensor]:
        side = torch.cuda.Stream(device=self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(size)
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(size)
        return graph, logits

    def run(self, ids: Sequence[int], positions: Sequence[int], tables: Sequence[list[int]]) -> Tensor:
        """Logits (B, V) of a decode step: token ids[b] at positions[b] of the request whose block
        table is tables[b] (the block of that position already allocated)."""
        b = len(ids)
        size = self.size_for(b)
        if size is None or b == 0:
            raise ValueError(f"a decode graph step takes 1..{self.max_batch} rows, got {b}")
        self._fill(size, ids, positions, tables)
        self.calls += 1
        if not self.capture:
            return self._forward(size)[:b]
        if size not in self.graphs:
            self.graphs[size] = self._capture(size)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:b]
