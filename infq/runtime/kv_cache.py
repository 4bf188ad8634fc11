"""The paged KV cache: a tensor-free block pool and the per-layer K/V tensors it indexes.

`BlockPool` is plain Python (no torch), after vLLM's block manager: a fixed number of blocks of
`block_size` token slots, a reference count per block, and a block table (a list of block ids) per
sequence. Tables grow as sequences grow and are freed when they finish. Sharing is by reference
count: `fork` gives a second table over the same blocks, and `make_writable` applies copy-on-write
to a shared block before it is written (it returns the (src, dst) copy the tensors must do).
Automatic prefix caching: once a block is full, its token ids, chained with the hash of the block
before it, key the block in a table, so a later request whose prompt starts with the same tokens
maps those blocks instead of recomputing them. Freed blocks keep their contents and key and sit in
an LRU free queue; a cached block is evicted (its key dropped) only when the queue hands it out.

`KVCache` holds the tensors in the layout of `kernels/ref.py`: per layer k/v (num_blocks,
block_size, Hkv, D), and for int8 / fp8 KV one float32 scale per (block, slot, kv head).
The pool size comes from a memory budget (`blocks_for_budget`).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from infq.errors import InfqError
from infq.runtime.arch import ModelConfig

KV_DTYPES = {"auto": None, "int8": torch.int8, "fp8": torch.float8_e4m3fn}
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30}


class BlockPool:
    """Fixed-size blocks with reference counts, prefix-cache keys and an LRU free queue."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise InfqError(f"a KV pool needs at least one block of at least one token (got {num_blocks} x {block_size})")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.key: list[tuple[int, tuple[int, ...]] | None] = [None] * num_blocks  # cache key of a full block
        self.cached: dict[tuple[int, tuple[int, ...]], int] = {}  # key -> block id
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU first

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        key = self.key[block]
        if key is not None:  # evict: the block is about to hold other tokens
            del self.cached[key]
            self.key[block] = None
        self.ref[block] = 1
        return block

    def _release(self, block: int) -> None:
        assert self.ref[block] > 0, f"block {block} freed twice"
        self.ref[block] -= 1
        if self.ref[block] == 0:
            self.free_queue[block] = None  # most recently used end

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Extend `table` in place to hold `num_tokens` tokens; False (and no change) if the pool
        has too few free blocks."""
        need = self.blocks_needed(num_tokens) - len(table)
        if need > self.num_free:
            return False
        table.extend(self._take() for _ in range(max(need, 0)))
        return True

    def free(self, table: list[int]) -> None:
        """Drop one reference to each block of `table` (last block first, so the tail of a
        sequence is evicted before its prefix) and empty the table."""
        for block in reversed(table):
            self._release(block)
        table.clear()

    def truncate(self, table: list[int], num_tokens: int) -> None:
        """Drop the blocks of `table` past the first `num_tokens` tokens (speculative decoding
        rolls back the slots of rejected draft tokens this way)."""
        keep = self.blocks_needed(num_tokens)
        while len(table) > keep:
            self._release(table.pop())

    def fork(self, table: list[int]) -> list[int]:
        """A second table sharing every block of `table` (e.g. parallel samples of one prompt)."""
        for block in table:
            self.ref[block] += 1
        return list(table)

    def make_writable(self, table: list[int], index: int) -> tuple[int, int] | None:
        """Copy-on-write before writing into block `table[index]`: if it is shared, or a cached
        block other requests may map, move this table onto a fresh copy and return (src, dst) for
        the tensors to copy; None when the block is private already. Raises if the pool is full."""
        block = table[index]
        if self.ref[block] == 1 and self.key[block] is None:
            return None
        if self.ref[block] == 1:  # private but cached: writing would corrupt the cached contents
            del self.cached[self.key[block]]  # type: ignore[arg-type]
            self.key[block] = None
            return None
        if not self.free_queue:
            raise MemoryError("no free block for copy-on-write")
        dst = self._take()
        self._release(block)
        table[index] = dst
        return block, dst

    # -- automatic prefix caching ---------------------------------------------------------------
    def block_keys(self, token_ids: Sequence[int], num_blocks: int | None = None) -> list[tuple[int, tuple[int, ...]]]:
        """Cache keys of the first `num_blocks` full blocks of `token_ids`: (hash of the parent
        key, this block's tokens). Equal keys mean equal token prefixes up to hash collisions of
        the parent chain (64-bit)."""
        bs = self.block_size
        n = len(token_ids) // bs if num_blocks is None else num_blocks
        keys, parent = [], 0
        for i in range(n):
            key = (parent, tuple(token_ids[i * bs:(i + 1) * bs]))
            keys.append(key)
            parent = hash(key)
        return keys

    def match_prefix(self, keys: Sequence[tuple[int, tuple[int, ...]]]) -> list[int]:
        """Take a reference to the cached blocks holding the longest cached prefix of the blocks
        keyed `keys` (from `block_keys`) and return them as the start of a block table."""
        table: list[int] = []
        if not self.prefix_caching:
            return table
        for key in keys:
            block = self.cached.get(key)
            if block is None:
                break
            if self.ref[block] == 0:
                del self.free_queue[block]
            self.ref[block] += 1
            table.append(block)
        return table

    def cache_full_blocks(self, table: list[int], token_ids: Sequence[int], num_computed: int,
                          keys: list[tuple[int, tuple[int, ...]]], start: int) -> int:
        """Register blocks `start`.. of `table` whose slots all hold computed tokens of `token_ids`.
        `keys` is the sequence's list of block keys, extended here as blocks fill (so each key is
        computed once); returns the number of full blocks, the next call's `start`."""
        bs = self.block_size
        full = min(num_computed // bs, len(table))
        while len(keys) < full:
            i = len(keys)
            keys.append((hash(keys[-1]) if keys else 0, tuple(token_ids[i * bs:(i + 1) * bs])))
        if not self.prefix_caching:
            return full
        for i in range(start, full):
            block, key = table[i], keys[i]
            if self.key[block] is None and key not in self.cached:  # first copy of these tokens wins
                self.key[block] = key
                self.cached[key] = block
        return full

    def check(self, tables: Sequence[list[int]]) -> None:
        """Assert the pool's invariants given every live table (tests call this)."""
        counts = [0] * self.num_blocks
        for table in tables:
            for block in table:
                counts[block] += 1
        assert counts == self.ref, "reference counts differ from the live tables"
        free = [b for b in range(self.num_blocks) if self.ref[b] == 0]
        assert sorted(self.free_queue) == free, "free queue differs from the unreferenced blocks"
        assert all(self.key[b] == k for k, b in self.cached.items()), "cache index out of step"
        assert sum(k is not None for k in self.key) == len(self.cached)


def parse_memory(text: str) -> int:
    """'64MiB', '1.5GiB', '512k', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise InfqError(f"--kv-memory {text!r} is not a size; write e.g. 256MiB, 2GiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def kv_storage_dtype(kv_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    if kv_dtype not in KV_DTYPES:
        raise InfqError(f"--kv-dtype {kv_dtype} is not supported; use auto, int8 or fp8")
    return KV_DTYPES[kv_dtype] or model_dtype


def block_bytes(cfg: ModelConfig, block_size: int, storage: torch.dtype) -> int:
    """Bytes one block takes across all layers: K and V codes, plus float32 scales if quantized."""
    per_token = cfg.num_kv_heads * cfg.head_dim * storage.itemsize
    if storage in (torch.int8, torch.float8_e4m3fn):
        per_token += cfg.num_kv_heads * 4
    return 2 * cfg.num_layers * block_size * per_token


def blocks_for_budget(budget: int, cfg: ModelConfig, block_size: int, storage: torch.dtype) -> int:
    """How many blocks fit in `budget` bytes; an error when not even one does."""
    per_block = block_bytes(cfg, block_size, storage)
    if budget < per_block:
        raise InfqError(f"--kv-memory {budget} bytes is less than one KV block ({per_block} bytes at "
                        f"block size {block_size}); raise --kv-memory or lower --block-size")
    return budget // per_block


class KVCache:
    """Per-layer paged K/V tensors (num_blocks, block_size, Hkv, D) [+ scales (num_blocks,
    block_size, Hkv) float32 for int8 / fp8]."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, storage: torch.dtype,
                 device: torch.device) -> None:
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, storage
        self.k = [torch.zeros(shape, dtype=storage, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=storage, device=device) for _ in range(cfg.num_layers)]
        self.quantized = storage in (torch.int8, torch.float8_e4m3fn)
        scale_shape = shape[:3]
        n = cfg.num_layers if self.quantized else 0
        self.k_scale = [torch.ones(scale_shape, dtype=torch.float32, device=device) for _ in range(n)]
        self.v_scale = [torch.ones(scale_shape, dtype=torch.float32, device=device) for _ in range(n)]
        self.nbytes = num_blocks * block_bytes(cfg, block_size, storage)

    def scales(self, layer: int) -> tuple[Tensor | None, Tensor | None]:
        return (self.k_scale[layer], self.v_scale[layer]) if self.quantized else (None, None)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: block src -> dst in every layer's tensors."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.k[0].device)
        dst = torch.tensor([p[1] for p in pairs], device=self.k[0].device)
        for tensors in (self.k, self.v, self.k_scale, self.v_scale):
            for t in tensors:
                t[dst] = t[src]
