"""Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded.

Pure functions of (logits, parameters, generator) so the same seed gives the same text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from infq.errors import InfqError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise InfqError(f"--temperature {self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise InfqError(f"--top-k {self.top_k} must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise InfqError(f"--top-p {self.top_p} must be in (0, 1]")


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """Next token ids (B,) from logits (B, V)."""
    if params.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(probs(logits, params), 1, generator=generator)[:, 0]


def probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution (B, V) float32 that `sample` draws from (temperature > 0): temperature,
    then top-k, then top-p. Speculative decoding compares these for the target and the draft."""
    logits = logits.float() / params.temperature  # (B, V)
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)
