"""The engine on a CUDA GPU (skipped without one): with the Triton attention kernels, fp32 greedy
outputs equal transformers' greedy generate on the demo model, batched and with chunked prefill,
and bf16 runs through both attention backends to the same text for most tokens."""

from __future__ import annotations

import pytest
import torch
import transformers

from infq.formats.hf import resolve_model
from infq.runtime.engine import Engine, EngineConfig
from infq.runtime.generate import eos_ids
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
def test_fp32_triton_equals_transformers(prompts, kw):
    loaded = load_model("demo", dtype="float32", device="cuda")
    eng = Engine(loaded.model, EngineConfig(attention="triton", **kw), eos_ids=eos_ids(loaded))
    assert eng.backend.name == "triton"
    outs = eng.generate(prompts, max_tokens=NEW)
    assert [o.token_ids for o in outs] == _hf(prompts, torch.float32)


def test_bf16_backends_agree(prompts):
    loaded = load_model("demo", dtype="bfloat16", device="cuda")
    runs = {}
    for name in ("torch", "triton"):
        eng = Engine(loaded.model, EngineConfig(attention=name), eos_ids=[])
        runs[name] = [o.token_ids for o in eng.generate(prompts, max_tokens=NEW, ignore_eos=True)]
    same = sum(a == b for x, y in zip(runs["torch"], runs["triton"], strict=True) for a, b in zip(x, y, strict=True))
    assert same >= 0.75 * len(prompts) * NEW  # bf16 rounding differs between kernels; greedy paths may fork late
