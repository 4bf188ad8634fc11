"""Perplexity under the two protocols published tables use (reference B.4).

`gptq`: the GPTQ/AWQ papers' protocol. The text is tokenized once; n = N // seqlen
non-overlapping windows (tail dropped), each fed independently; a window's NLL is its mean
cross-entropy over the seqlen-1 shifted positions times seqlen; ppl = exp(sum NLL / (n * seqlen)).
`llamacpp`: llama.cpp's `llama-perplexity`: chunks of seqlen (default 512), each chunk's first token
replaced by BOS, only the second half scored (positions seqlen/2 .. seqlen-2 predict the next
token); ppl = exp(mean NLL), with llama.cpp's +/- from the per-token NLL variance.
The two are not comparable with each other; results carry their protocol's name. Logits are
formed in slices of positions so a 150k-token vocabulary never needs a (seqlen, V) fp32 tensor
per window at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from infq.errors import InfqError

PROTOCOLS = ("gptq", "llamacpp")
DEFAULT_SEQLEN = {"gptq": 2048, "llamacpp": 512}
_SLICE = 512  # positions per logits slice


@dataclass(frozen=True)
class PplResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    stderr: float  # llama.cpp's +/- on ppl (0 for the gptq protocol)
    tokens: int  # tokens in the windows evaluated
    scored: int  # tokens whose prediction was scored
    windows: int
    seqlen: int
    protocol: str

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def default_seqlen(protocol: str, max_positions: int) -> int:
    return min(DEFAULT_SEQLEN[protocol], max_positions)


def count_windows(n_tokens: int, seqlen: int, limit: int | None) -> int:
    n = n_tokens // seqlen
    if n == 0:
        raise InfqError(
            f"the dataset has {n_tokens} tokens; at least {seqlen} (one window of --seqlen) are "
            "needed: use a longer text or a smaller --seqlen"
        )
    return n if limit is None else max(1, min(n, limit))


def _token_nll(model: torch.nn.Module, window: Tensor, first: int) -> Tensor:
    """NLL (nats, fp32) of tokens window[first+1:] given their prefixes; window is (1, T)."""
    hidden = model.hidden(window)  # (1, T, C)
    targets = window[0, first + 1 :].to(hidden.device)  # (T-first-1,)
    out = []
    for s in range(first, window.shape[1] - 1, _SLICE):
        e = min(s + _SLICE, window.shape[1] - 1)
        logits = model.head(hidden[0, s:e]).float()  # (e-s, V)
        out.append(F.cross_entropy(logits, targets[s - first : e - first], reduction="none"))
    return torch.cat(out)  # (T-first-1,)


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    tokens: Tensor,
    *,
    seqlen: int,
    protocol: str = "gptq",
    bos_id: int | None = None,
    limit: int | None = None,
    on_window: Callable[[int, int, float], None] | None = None,
) -> PplResult:
    """Perplexity of `model` (exposing `hidden` and `head`) on token ids `tokens` (N,).

    `on_window(i, n, running_ppl)` is called after each window (progress display).
    """
    if protocol not in PROTOCOLS:
        raise InfqError(f"--protocol {protocol} is unknown; use one of {', '.join(PROTOCOLS)}")
    if seqlen < 2 or (protocol == "llamacpp" and seqlen < 4):
        raise InfqError(f"--seqlen {seqlen} is too small; use at least 4")
    n = count_windows(int(tokens.numel()), seqlen, limit)
    tokens = tokens.reshape(-1)
    nll_sum, nll2_sum, scored, denom = 0.0, 0.0, 0, 0
    for i in range(n):
        window = tokens[i * seqlen : (i + 1) * seqlen].clone()[None]  # (1, seqlen)
        if protocol == "gptq":
            nll = _token_nll(model, window, 0)
            nll_sum += float(nll.double().mean()) * seqlen  # the papers' loss * seqlen
            denom += seqlen
        else:
            if bos_id is not None:
                window[0, 0] = bos_id
            nll = _token_nll(model, window, seqlen // 2)
            nll_sum += float(nll.double().sum())
            nll2_sum += float(nll.double().pow(2).sum())
            denom += nll.numel()
        scored += nll.numel()
        if on_window is not None:
            on_window(i + 1, n, math.exp(nll_sum / denom))
    mean = nll_sum / denom
    ppl = math.exp(mean)
    stderr = 0.0
    if protocol == "llamacpp" and scored > 1:
        var = max(nll2_sum / scored - mean * mean, 0.0)
        stderr = math.sqrt(var / (scored - 1)) * ppl
    return PplResult(
        ppl=ppl, nll=mean, stderr=stderr, tokens=n * seqlen, scored=scored, windows=n,
        seqlen=seqlen, protocol=protocol,
    )


@dataclass(frozen=True)
class EvalRequest:
    model: str
    dataset: str
    data_file: str | None = None
    seqlen: int | None = None
    protocol: str = "gptq"
    limit: int | None = None
    dtype: str = "auto"
    device: str = "cpu"


def evaluate_ppl(req: EvalRequest, on_window: Callable[[int, int, float], None] | None = None) -> dict[str, object]:
    """Load `req.model`, tokenize the dataset's evaluation split once, and score it."""
    import time

    from infq.eval.datasets import canonical_name, eval_tokens
    from infq.runtime.loader import load_model

    if req.protocol not in PROTOCOLS:
        raise InfqError(f"--protocol {req.protocol} is unknown; use one of {', '.join(PROTOCOLS)}")
    if req.limit is not None and req.limit < 1:
        raise InfqError(f"--limit {req.limit} must be at least 1")
    dataset = canonical_name(req.dataset)
    loaded = load_model(req.model, dtype=req.dtype, device=req.device)
    max_pos = loaded.config.max_position_embeddings
    seqlen = req.seqlen or default_seqlen(req.protocol, max_pos)
    if seqlen > max_pos:
        raise InfqError(f"--seqlen {seqlen} exceeds the model's {max_pos} positions; use --seqlen {max_pos} or less")
    tokens = eval_tokens(loaded.tokenizer, dataset, data_file=req.data_file, seqlen=seqlen)
    start = time.perf_counter()
    result = perplexity(
        loaded.model, tokens, seqlen=seqlen, protocol=req.protocol,
        bos_id=loaded.tokenizer.bos_token_id, limit=req.limit, on_window=on_window,
    )
    return {
        **result.to_dict(),
        "model": str(loaded.path),
        "format": loaded.format,
        "dataset": dataset,
        "dataset_tokens": int(tokens.numel()),
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "seconds": round(time.perf_counter() - start, 3),
    }
