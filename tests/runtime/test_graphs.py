"""Decode steps through `runtime.graphs.DecodeGraphs`' static, padded buffers (eager here; captured
as CUDA graphs on a GPU, tests/runtime/test_engine_gpu.py): the engine's greedy outputs stay equal to
transformers', batched, with chunked prefill, under preemption and with prefix caching; a padded
step's logits equal the plain path's within fp32 rounding; the scratch block is never handed out."""

from __future__ import annotations

import pytest
import torch
from runtime.test_engine import NEW, demo, expected, prompt_ids  # noqa: F401 (fixtures; tests/ is on sys.path)
from steplogits import step_logits

from infq.runtime.engine import Engine, EngineConfig
from infq.runtime.generate import eos_ids
from infq.runtime.graphs import bucket_sizes
from infq.runtime.kv_cache import block_bytes


def _engine(demo, **kw) -> Engine:  # noqa: F811
    return Engine(demo.model, EngineConfig(cuda_graphs=True, **kw), eos_ids=eos_ids(demo), tokenizer=demo.tokenizer)


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(3) == [1, 2, 3]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(30) == [1, 2, 4, 8, 16, 24, 30]
    assert bucket_sizes(64)[-3:] == [48, 56, 64]


@pytest.mark.parametrize("kw", [{}, {"max_num_batched_tokens": 7}, {"block_size": 5, "max_num_seqs": 3}],
                         ids=["batched", "chunked-prefill", "odd-blocks-3-seqs"])
def test_greedy_through_padded_decode_equals_transformers(demo, prompt_ids, expected, kw):  # noqa: F811
    eng = _engine(demo, **kw)
    outs = eng.generate(prompt_ids, max_tokens=NEW)
    assert [o.token_ids for o in outs] == expected
    assert eng.graphs is not None and eng.graphs.calls > 0  # decode steps took the padded path
    assert eng.pool.num_free == eng.pool.num_blocks


def test_padded_decode_under_preemption(demo, prompt_ids, expected):  # noqa: F811
    per_block = block_bytes(demo.config, 16, torch.float32)
    eng = _engine(demo, kv_memory=14 * per_block)
    outs = eng.generate(prompt_ids, max_tokens=NEW)
    assert eng.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
    assert eng.pool.num_blocks == 14 and eng.kv.k[0].shape[0] == 15  # the scratch block is outside the pool


def test_padded_step_logits_equal_plain_step(demo, prompt_ids):  # noqa: F811
    """Three requests decode one token each: 3 rows in the bucket of 4 (one padding row), against
    the same step through the engine's flattened batch. fp32; the rows see the same weights and
    contexts, so only the attention's summation over a wider (masked) table may differ."""
    plain, padded = Engine(demo.model, EngineConfig()), _engine(demo)
    logits = {name: step_logits(eng, prompt_ids[:3], steps=2)[3:]  # the decode step after the prefill
              for name, eng in (("plain", plain), ("padded", padded))}
    assert padded.graphs.calls == 1 and logits["padded"].shape == logits["plain"].shape == (3, demo.config.vocab_size)
    torch.testing.assert_close(logits["padded"], logits["plain"], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: test_engine_gpu.py runs the kernels compiled")
def test_triton_path_padded_equals_eager_under_the_interpreter():
    """The GPU path's logic on a CPU: the Triton paged-attention, write_kv and FlashAttention kernels
    under TRITON_INTERPRET=1 (tests/conftest.py), fp16 demo model. Padded decode steps (tables as wide
    as the context, a scratch block for padding rows, stale table entries past a row's length) give
    exactly the eager Triton path's logits; with the fused RMSNorm/rotary/SiLU kernels on as well,
    they stay within fp16 rounding of the torch path and pick the same tokens."""
    from infq.runtime.loader import load_model

    m = load_model("demo", dtype="float16", serving=True)
    texts = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, x):\n" * 3]
    ids = [m.tokenizer(t).input_ids for t in texts]

    def run(**kw):
        return step_logits(Engine(m.model, EngineConfig(**kw)), ids, steps=4)

    eager = run(attention="triton")
    padded = run(attention="triton", cuda_graphs=True)
    assert torch.equal(padded, eager)
    torch_path = run(attention="torch")
    m.model.use_fused_ops()
    try:
        fused = run(attention="triton", cuda_graphs=True)
    finally:
        m.model.use_fused_ops(False)
    scale = torch_path.abs().max().item()
    assert (eager - torch_path).abs().max().item() <= 3 * torch.finfo(torch.float16).eps * scale  # 3 fp16 ulps of the largest logit
    assert (fused - torch_path).abs().max().item() <= 3 * torch.finfo(torch.float16).eps * scale  # 3 fp16 ulps of the largest logit
    assert torch.equal(fused.argmax(-1), torch_path.argmax(-1))
