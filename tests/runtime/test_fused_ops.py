"""The serving model with `use_fused_ops` (RMSNorm + residual add, rotary and SiLU-gate as the
kernels.fused Triton kernels; on by default when serving on CUDA), run here under TRITON_INTERPRET=1
on the fp16 demo model (fp16, not bf16: the interpreter's fp32 -> bf16 cast truncates where a GPU
rounds). Oracle: the same engine steps on the float32 model. The fused path's fp16 logits may be at
most tolerances.FACTOR times as far from it as the PyTorch fp16 path's, plus a quarter-ulp floor
(measured: 0.0062 against PyTorch's 0.0100, max |logit| 16: one rounding per op instead of several)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from steplogits import step_logits
from tolerances import assert_within_baseline

from infq.runtime.engine import Engine, EngineConfig
from infq.runtime.loader import load_model

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: test_engine_gpu.py runs them compiled")
PROMPTS = ["def fibonacci(n):\n    if n < 2:", "import os\nimport sys\n\n", "class Stack:\n    def push(self, x):"]


@pytest.fixture(scope="module")
def interpreted():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: reload the module
    mod = importlib.import_module("infq.kernels.fused")
    import triton

    if isinstance(mod._rms_norm_kernel, triton.runtime.JITFunction):
        importlib.reload(mod)
    return mod


def _two_steps(loaded, prompt_ids) -> torch.Tensor:
    """Logits of a prefill step (every prompt) and of the decode step after it: (2 * B, V) float."""
    return step_logits(Engine(loaded.model, EngineConfig()), prompt_ids)


def test_fused_ops_within_fp16_baseline(interpreted):
    oracle_model = load_model("demo", dtype="float32", serving=True)
    prompt_ids = [oracle_model.tokenizer(p).input_ids for p in PROMPTS]
    plain = load_model("demo", dtype="float16", serving=True, tokenizer=False)
    fused = load_model("demo", dtype="float16", serving=True, tokenizer=False)
    assert not plain.model.fused_ops  # a CPU load leaves it off
    assert fused.model.use_fused_ops() and all(b.fused_ops for b in fused.model.blocks)
    calls = {"rms": 0, "rot": 0, "silu": 0}
    for name, key in (("rms_norm", "rms"), ("rotary_embedding", "rot"), ("silu_mul", "silu")):
        fn = getattr(interpreted, name)

        def counted(*a, _fn=fn, _key=key, **kw):
            calls[_key] += 1
            return _fn(*a, **kw)

        setattr(interpreted, name, counted)
    try:
        out = _two_steps(fused, prompt_ids)
    finally:
        importlib.reload(interpreted)
    layers = fused.config.num_layers
    assert calls == {"rms": 2 * (2 * layers + 1), "rot": 2 * layers, "silu": 2 * layers}  # two steps
    oracle = _two_steps(oracle_model, prompt_ids)
    base = _two_steps(plain, prompt_ids)
    assert_within_baseline(out.half(), oracle, base.half(), floor_ulps=0.25)
    # the same greedy choices as the PyTorch fp16 path wherever that one is decisive
    margin = base.topk(2, -1).values
    decisive = (margin[:, 0] - margin[:, 1]) > 0.1
    assert (out.argmax(-1) == base.argmax(-1))[decisive].all()
