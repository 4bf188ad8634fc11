"""Choosing the next token from logits: repetition penalty, greedy, temperature, top-k, top-p,
min-p, seeded.

Pure functions of (logits, parameters, generator, token history) so the same seed gives the same
text. The order and semantics are transformers' (`generate`'s logits processors, also vLLM's): the
repetition penalty divides the positive logits (multiplies the negative ones) of every token in the
prompt and the output so far, before greedy selection or sampling; then temperature, top-k, top-p,
and min-p (drop tokens less likely than min_p times the most likely one).
"""

from __future__ import annotations

from collections.abc import Sequence
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
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off

    def __post_init__(self) -> None:
        if not 0 <= self.min_p <= 1:
            raise InfqError(f"--min-p {self.min_p} must be in [0, 1] (0 = off)")
        if self.repetition_penalty <= 0:
            raise InfqError(f"--repetition-penalty {self.repetition_penalty} must be > 0 (1 = off, 1.1-1.3 usual)")
        if self.temperature < 0:
            raise InfqError(f"--temperature {self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise InfqError(f"--top-k {self.top_k} must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise InfqError(f"--top-p {self.top_p} must be in (0, 1]")


def penalize(logits: Tensor, history: Sequence[int], penalty: float) -> Tensor:
    """logits (B, V) with the repetition penalty applied to the tokens in `history` (every row)."""
    if penalty == 1 or not history:
        return logits
    ids = torch.tensor(sorted(set(history)), dtype=torch.long, device=logits.device)
    seen = logits.index_select(-1, ids)
    return logits.index_copy(-1, ids, torch.where(seen > 0, seen / penalty, seen * penalty))


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None,
           history: Sequence[int] = ()) -> Tensor:
    """Next token ids (B,) from logits (B, V); `history`: the prompt and outputs so far (for the
    repetition penalty)."""
    logits = penalize(logits, history, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(probs(logits, params), 1, generator=generator)[:, 0]


def probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution (B, V) float32 that `sample` draws from (temperature > 0): temperature,
    then top-k, then top-p, then min-p. Speculative decoding compares these for the target and the draft."""
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
    if params.min_p > 0:
        p = logits.softmax(-1)
        logits = logits.masked_fill(p < params.min_p * p.max(-1, keepdim=True).values, float("-inf"))
    return logits.softmax(-1)
