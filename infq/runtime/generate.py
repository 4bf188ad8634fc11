"""Single-prompt generation with a contiguous KV cache, streaming token by token.

`infq run` uses this until the paged-KV continuous-batching engine (runtime issue) takes over;
the sampling rules (`sampling.py`) and stopping rules (EOS, stop strings, max tokens) are the
ones the engine keeps.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from infq.errors import InfqError
from infq.runtime.model import DecoderModel
from infq.runtime.sampling import SamplingParams, sample


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0
    token_ids: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        decode = self.total_s - self.ttft_s
        return (self.new_tokens - 1) / decode if self.new_tokens > 1 and decode > 0 else 0.0


@torch.inference_mode()
def generate(
    model: DecoderModel,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    params: SamplingParams,
    eos_ids: set[int],
    stats: GenerationStats,
) -> Iterator[int]:
    """Yield generated token ids one at a time; fills `stats` as it goes."""
    limit = model.cfg.max_position_embeddings
    if not prompt_ids:
        raise InfqError("the prompt is empty; pass --prompt TEXT")
    if len(prompt_ids) + 1 > limit:
        raise InfqError(f"the prompt has {len(prompt_ids)} tokens; the model holds {limit}: shorten it")
    max_new = min(max_new_tokens, limit - len(prompt_ids))
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    cache = model.new_cache()
    ids = torch.tensor([prompt_ids], device=model.device)  # (1, T)
    stats.prompt_tokens = len(prompt_ids)
    start = time.perf_counter()
    for step in range(max_new):
        logits = model(ids, cache)[:, -1]  # (1, V)
        token = int(sample(logits, params, gen)[0])
        if step == 0:
            stats.ttft_s = time.perf_counter() - start
        stats.new_tokens += 1
        stats.token_ids.append(token)
        stats.total_s = time.perf_counter() - start
        yield token
        if token in eos_ids:
            return
        ids = torch.tensor([[token]], device=model.device)


def generate_text(
    model: str,
    prompt: str,
    max_new_tokens: int,
    params: SamplingParams,
    ignore_eos: bool,
    dtype: str,
    device: str,
    stats: GenerationStats,
) -> Iterator[str]:
    """Load `model`, then yield decoded text pieces as tokens are generated."""
    from infq.runtime.loader import load_model

    if max_new_tokens < 1:
        raise InfqError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    loaded = load_model(model, dtype=dtype, device=device)
    tok = loaded.tokenizer
    eos = loaded.config.eos_token_id
    eos_ids = set() if ignore_eos else ({eos} if isinstance(eos, int) else set(eos or ()))
    if not ignore_eos and tok.eos_token_id is not None:
        eos_ids.add(tok.eos_token_id)
    prompt_ids = tok(prompt).input_ids
    prefix = tok.decode(prompt_ids, skip_special_tokens=True)
    emitted = ""
    for _ in generate(model=loaded.model, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens,
                      params=params, eos_ids=eos_ids, stats=stats):
        # Decode the whole continuation each time so multi-byte characters come out whole.
        text = tok.decode(prompt_ids + stats.token_ids, skip_special_tokens=True)[len(prefix):]
        if text.endswith("\ufffd"):
            continue
        yield text[len(emitted):]
        emitted = text
