"""Block pool invariants under random operation sequences (property-based), and the KV budget.

A shadow copy of every block's contents stands in for the KV tensors: each "compute" writes the
sequence's token ids into its slots (after copy-on-write), so the test can check that every live
sequence always reads its own tokens back, whatever was shared, cached, evicted or copied.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infq.errors import InfqError
from infq.runtime.arch import ModelConfig
from infq.runtime.kv_cache import BlockPool, KVCache, block_bytes, blocks_for_budget, parse_memory


class Sim:
    """The pool plus live sequences and the shadow contents of every block."""

    def __init__(self, num_blocks: int, bs: int) -> None:
        self.pool = BlockPool(num_blocks, bs)
        self.contents: list[list[int | None]] = [[None] * bs for _ in range(num_blocks)]
        self.seqs: dict[int, dict] = {}
        self.next_id = 0

    def _compute(self, seq: dict) -> None:
        """Write tokens computed..end into the slots, copying shared blocks first."""
        bs, pool = self.pool.block_size, self.pool
        for p in range(seq["computed"], len(seq["tokens"])):
            pair = pool.make_writable(seq["table"], p // bs)
            if pair is not None:
                self.contents[pair[1]] = list(self.contents[pair[0]])
            self.contents[seq["table"][p // bs]][p % bs] = seq["tokens"][p]
        seq["computed"] = len(seq["tokens"])
        seq["registered"] = pool.cache_full_blocks(seq["table"], seq["tokens"], seq["computed"], seq["keys"],
                                                   seq["registered"])

    def _room(self, seq_len_after: int, table: list[int]) -> bool:
        # a new block may be needed, plus one for copy-on-write of the block written
        return self.pool.num_free >= self.pool.blocks_needed(seq_len_after) - len(table) + 1

    def new(self, tokens: list[int]) -> None:
        bs = self.pool.block_size
        keys = self.pool.block_keys(tokens, (len(tokens) - 1) // bs)
        table = self.pool.match_prefix(keys)
        for i, block in enumerate(table):  # a cache hit holds exactly these tokens
            assert self.contents[block] == tokens[i * bs:(i + 1) * bs]
        hits = len(table)
        if not self._room(len(tokens), table) or not self.pool.grow(table, len(tokens)):
            self.pool.free(table)
            return
        seq = dict(table=table, tokens=list(tokens), computed=hits * bs, keys=[], registered=hits)
        self.seqs[self.next_id] = seq
        self.next_id += 1
        self._compute(seq)

    def append(self, sid: int, token: int) -> None:
        seq = self.seqs[sid]
        if not self._room(len(seq["tokens"]) + 1, seq["table"]):
            return
        seq["tokens"].append(token)
        assert self.pool.grow(seq["table"], len(seq["tokens"]))
        self._compute(seq)

    def fork(self, sid: int) -> None:
        seq = self.seqs[sid]
        self.seqs[self.next_id] = {**seq, "table": self.pool.fork(seq["table"]), "tokens": list(seq["tokens"]),
                                   "keys": list(seq["keys"])}
        self.next_id += 1

    def free(self, sid: int) -> None:
        self.pool.free(self.seqs.pop(sid)["table"])

    def check(self) -> None:
        self.pool.check([s["table"] for s in self.seqs.values()])
        bs = self.pool.block_size
        for s in self.seqs.values():
            got = [self.contents[s["table"][p // bs]][p % bs] for p in range(s["computed"])]
            assert got == s["tokens"], "a sequence reads back tokens it did not write"
        for key, block in self.pool.cached.items():  # a cached block holds its key's tokens
            assert tuple(self.contents[block]) == key[1]


ops = st.lists(st.tuples(st.sampled_from(["new", "append", "fork", "free"]), st.integers(0, 10**6),
                         st.lists(st.integers(0, 2), min_size=1, max_size=14)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(num_blocks=st.integers(1, 12), bs=st.integers(1, 4), ops=ops)
def test_pool_invariants_under_random_ops(num_blocks, bs, ops):
    sim = Sim(num_blocks, bs)
    for op, pick, tokens in ops:
        ids = sorted(sim.seqs)
        if op == "new":
            sim.new(tokens)  # a 3-letter alphabet: shared prefixes (and cache hits) are common
        elif ids:
            sid = ids[pick % len(ids)]
            if op == "append":
                sim.append(sid, tokens[0])
            elif op == "fork":
                sim.fork(sid)
            else:
                sim.free(sid)
        sim.check()
    for sid in list(sim.seqs):
        sim.free(sid)
        sim.check()
    assert sim.pool.num_free == num_blocks and not any(sim.pool.ref)  # nothing leaked


def test_prefix_cache_hit_and_lru_eviction():
    pool = BlockPool(4, 2)
    a = []
    assert pool.grow(a, 4)
    keys = []
    pool.cache_full_blocks(a, [5, 6, 7, 8], 4, keys, 0)
    pool.free(a)
    assert pool.num_free == 4 and len(pool.cached) == 2  # freed, still cached
    hit = pool.match_prefix(pool.block_keys([5, 6, 7, 8, 9]))
    assert len(hit) == 2 and pool.num_free == 2
    assert pool.match_prefix(pool.block_keys([5, 7, 7, 8])) == []  # first block differs: nothing
    pool.free(hit)
    b = []
    assert pool.grow(b, 8)  # takes every block: the cached ones are evicted
    assert not pool.cached and pool.match_prefix(pool.block_keys([5, 6])) == []


def test_copy_on_write_returns_the_copy():
    pool = BlockPool(3, 4)
    a = []
    pool.grow(a, 3)
    b = pool.fork(a)
    assert pool.ref[a[0]] == 2
    pair = pool.make_writable(b, 0)
    assert pair == (a[0], b[0]) and a[0] != b[0] and pool.ref[a[0]] == 1 and pool.ref[b[0]] == 1
    assert pool.make_writable(b, 0) is None  # private now


def _cfg():
    return ModelConfig.from_hf(dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                    max_position_embeddings=64, rms_norm_eps=1e-5))


def test_budget_and_tensors():
    cfg = _cfg()
    per = block_bytes(cfg, 16, torch.float32)
    assert per == 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 slots, 2 heads x 16 dims, fp32
    assert blocks_for_budget(10 * per + 5, cfg, 16, torch.float32) == 10
    with pytest.raises(InfqError, match="less than one KV block"):
        blocks_for_budget(per - 1, cfg, 16, torch.float32)
    kv = KVCache(cfg, 3, 16, torch.int8, torch.device("cpu"))
    assert kv.k[0].shape == (3, 16, 2, 16) and kv.k_scale[0].shape == (3, 16, 2) and kv.quantized
    assert kv.nbytes == 3 * block_bytes(cfg, 16, torch.int8)
    kv.k[1][0] = 7
    kv.copy_blocks([(0, 2)])
    assert (kv.k[1][2] == 7).all()
    assert parse_memory("1.5KiB") == 1536 and parse_memory("2GiB") == 2 * 2**30 and parse_memory("100") == 100
    with pytest.raises(InfqError, match="not a size"):
        parse_memory("lots")
