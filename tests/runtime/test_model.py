"""The generic decoder's logits equal transformers' for the same checkpoint (fp32, <= 1e-4)."""

from __future__ import annotations

import pytest
import torch
import transformers
from tinymodels import make_tiny_model

from infq.runtime.loader import load_model

TOL = 1e-4  # issue 2: fp32 max abs diff

CASES = {
    "llama": dict(family="llama"),
    "llama-mha-tied": dict(family="llama", num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope": dict(
        family="llama",
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32),
    ),
    "llama-linear-rope": dict(family="llama", rope_scaling=dict(rope_type="linear", factor=2.0)),
    # dynamic NTK scaling only changes frequencies past the original length: 48 tokens > 32
    "llama-dynamic-rope": dict(family="llama", max_position_embeddings=32,
                               rope_scaling=dict(rope_type="dynamic", factor=2.0)),
    "mistral": dict(family="mistral", sliding_window=None),
    "mistral-window": dict(family="mistral", sliding_window=16),
    "qwen2-bias": dict(family="qwen2", num_key_value_heads=1),
}


def _reference_logits(path, ids):
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(ids).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    kwargs = dict(CASES[case])
    path = make_tiny_model(tmp_path / case, **kwargs)
    ids = torch.randint(3, 320, (2, 48), generator=torch.Generator().manual_seed(1))
    expected = _reference_logits(path, ids)
    for resident in (True, False):
        got = load_model(str(path), resident=resident, tokenizer=False).model(ids)
        assert got.shape == expected.shape
        diff = (got - expected).abs().max().item()
        assert diff <= TOL, f"{case} resident={resident}: max abs diff {diff}"


def test_fp16_checkpoint_is_memory_mapped_and_matches(tmp_path):
    path = make_tiny_model(tmp_path / "half", dtype=torch.float16)
    ids = torch.randint(3, 320, (1, 32), generator=torch.Generator().manual_seed(2))
    expected = _reference_logits(path, ids)  # transformers upcasts the fp16 weights to fp32 too
    got = load_model(str(path), tokenizer=False).model(ids)
    assert (got - expected).abs().max().item() <= TOL
