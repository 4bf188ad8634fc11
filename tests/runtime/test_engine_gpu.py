"""The engine on a CUDA GPU (skipped without one): fp32 greedy outputs equal transformers' greedy
generate on the demo model, batched and with chunked prefill; one mixed step through the Triton
attention (paged decode + varlen FlashAttention) equals the torch path's; bf16 runs through both
backends to the same tokens for most positions."""

from __future__ import annotations

import pytest
import torch
import transformers

from infq.formats.hf import resolve_model
from infq.runtime.attention import PagedLayer, TorchAttention, TritonAttention, build_batch
from infq.runtime.engine import Engine, EngineConfig
from infq.runtime.generate import eos_ids
from infq.runtime.kv_cache import KVCache
from infq.runtime.loader import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n\ndef main(argv):\n    parser = ", "class Stack:\n    def",
           "x = [i * i for i in range(10)]\nprint(" * 6]
NEW = 24


@pytest.fixture(scope="module")
def prompts():
    tok = load_model("demo", tokenizer=True, device="cpu").tokenizer
    return [tok(p).input_ids for p in PROMPTS]


def _hf(prompts, dtype):
    model = transformers.AutoModelForCausalLM.from_pretrained(resolve_model("demo"), dtype=dtype).cuda().eval()
    return [model.generate(torch.tensor([p], device="cuda"), max_new_tokens=NEW, do_sample=False,
                           pad_token_id=0)[0, len(p):].tolist() for p in prompts]


@pytest.mark.parametrize("kw", [{}, {"max_num_batched_tokens": 9}], ids=["batched", "chunked"])
def test_fp32_equals_transformers(prompts, kw):
    loaded = load_model("demo", dtype="float32", device="cuda")  # fp32: the torch attention on the GPU
    eng = Engine(loaded.model, EngineConfig(**kw), eos_ids=eos_ids(loaded))
    outs = eng.generate(prompts, max_tokens=NEW)
    assert [o.token_ids for o in outs] == _hf(prompts, torch.float32)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8, torch.float8_e4m3fn])
def test_triton_step_matches_torch_step(kv_dtype):
    """One mixed step (decodes, a whole prefill, a chunk over a prefix) through both backends."""
    cfg = load_model("demo", tokenizer=False).config
    kv = KVCache(cfg, 40, 16, kv_dtype, torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(37, 1), (5, 1), (0, 23), (40, 17)]  # (cached, new) per request
    tables = [list(range(i * 10, i * 10 + -(-(c + n) // 16))) for i, (c, n) in enumerate(shapes)]
    hkv, d, h = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
    for t, (c, _) in zip(tables, shapes, strict=True):
        if c:
            pre = build_batch([t], [0], [c], 16, torch.device("cuda"))
            k, v = (torch.randn(c, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
            TorchAttention().write(kv, 0, k, v, pre)
    batch = build_batch(tables, [c for c, _ in shapes], [n for _, n in shapes], 16, torch.device("cuda"))
    n = sum(n for _, n in shapes)
    q = torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    outs = []
    for backend in (TorchAttention(), TritonAttention()):
        kv2 = KVCache(cfg, 40, 16, kv_dtype, torch.device("cuda"))
        for a, b in zip(kv2.k + kv2.v + kv2.k_scale + kv2.v_scale, kv.k + kv.v + kv.k_scale + kv.v_scale, strict=True):
            a.copy_(b)
        outs.append(PagedLayer(backend, kv2, 0, batch).attend(q, k, v, None).float())
    assert (outs[0] - outs[1]).abs().max().item() <= 2e-2  # bf16 outputs of two summation orders


def test_bf16_backends_agree(prompts):
    loaded = load_model("demo", dtype="bfloat16", device="cuda")
    runs = {}
    for name in ("torch", "triton"):
        eng = Engine(loaded.model, EngineConfig(attention=name), eos_ids=[])
        runs[name] = [o.token_ids for o in eng.generate(prompts, max_tokens=NEW, ignore_eos=True)]
    same = sum(a == b for x, y in zip(runs["torch"], runs["triton"], strict=True) for a, b in zip(x, y, strict=True))
    assert same >= 0.75 * len(prompts) * NEW  # bf16 rounding differs between kernels; greedy paths may fork late


def test_cuda_graph_decode_fp32_equals_transformers(prompts):
    """fp32 (torch attention on the GPU): decode steps replayed from CUDA graphs give transformers'
    greedy tokens; graphs were captured for the buckets the batch passed through."""
    loaded = load_model("demo", dtype="float32", device="cuda")
    eng = Engine(loaded.model, EngineConfig(cuda_graphs=True), eos_ids=eos_ids(loaded))
    outs = eng.generate(prompts, max_tokens=NEW)
    assert eng.graphs.calls > 0 and eng.graphs.graphs
    assert [o.token_ids for o in outs] == _hf(prompts, torch.float32)


def test_cuda_graph_decode_bf16_matches_eager(prompts):
    """bf16 through the Triton kernels: one padded graph step's logits equal the eager step's within
    bf16 rounding (the wider block table changes the paged kernel's split, so its summation order),
    and whole generations agree on most tokens."""
    loaded = load_model("demo", dtype="bfloat16", device="cuda")
    runs = {}
    for graphs in (False, True):
        eng = Engine(loaded.model, EngineConfig(cuda_graphs=graphs), eos_ids=[])
        runs[graphs] = [o.token_ids for o in eng.generate(prompts, max_tokens=NEW, ignore_eos=True)]
    assert eng.graphs.graphs
    same = sum(a == b for x, y in zip(runs[False], runs[True], strict=True) for a, b in zip(x, y, strict=True))
    assert same >= 0.75 * len(prompts) * NEW
    from steplogits import step_logits

    steps = {}
    for graphs in (False, True):  # prefill, a decode step that captures (graphs), then a replay
        eng = Engine(loaded.model, EngineConfig(cuda_graphs=graphs), eos_ids=[])
        steps[graphs] = step_logits(eng, prompts[:3], steps=3, max_tokens=4)[-3:]
    assert (steps[True] - steps[False]).abs().max().item() <= 0.05 * steps[False].abs().max().item()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fused_ops_within_baseline(prompts, dtype):
    """Serving loads on CUDA turn the fused RMSNorm/rotary/SiLU-gate kernels on; one prefill and one
    decode step's logits stay within tolerances.FACTOR of the PyTorch path's error against fp32."""
    from steplogits import step_logits
    from tolerances import assert_within_baseline

    def two_steps(model):
        return step_logits(Engine(model, EngineConfig()), prompts)

    oracle = two_steps(load_model("demo", dtype="float32", device="cuda", serving=True, tokenizer=False).model)
    model = load_model("demo", dtype=dtype, device="cuda", serving=True, tokenizer=False).model
    assert model.fused_ops
    fused = two_steps(model)
    model.use_fused_ops(False)
    plain = two_steps(model)
    half = getattr(torch, dtype)
    assert_within_baseline(fused.to(half), oracle, plain.to(half), floor_ulps=0.5)
