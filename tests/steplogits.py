"""The logits an engine samples from, step by step (tests comparing two model paths)."""

from __future__ import annotations

from typing import Any

import torch


def step_logits(engine: Any, prompts: list[list[int]], steps: int = 2, max_tokens: int = 3) -> torch.Tensor:
    """Queue `prompts` (EOS ignored), run `steps` engine steps and return the logits of every row the
    engine sampled from in them, in order, as float: the first step prefills every prompt, the next
    ones decode."""
    seen: list[torch.Tensor] = []
    orig = engine._sample
    engine._sample = lambda logits, reqs: seen.append(logits.float().clone()) or orig(logits, reqs)
    for p in prompts:
        engine.add_request(p, max_tokens=max_tokens, ignore_eos=True)
    for _ in range(steps):
        engine.step()
    return torch.cat(seen)
