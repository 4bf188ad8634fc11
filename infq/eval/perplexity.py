"""Perplexity under the two protocols published tables use (reference B.4).

`gptq`: the GPTQ/AWQ papers' protocol. The text is tokenized once; n = N // seqlen
non-overlapping windows (tail dropped), each fed independently; a window's NLL is its mean
cross-entropy over the seqlen-1 shifted positions times seqlen; ppl = exp(sum NLL / (n * seqlen)).
`llamacpp`: llama.cpp's `llama-perplexity` (tools/perplexity/perplexity.cpp): a local text file is
read whole, byte for byte, as `-f FILE` reads it (a named dataset without a local file is joined
the dataset's way) and tokenized once with the tokenizer's own BOS; chunks of seqlen (default 512),
each chunk's first token replaced by BOS when the tokenizer adds one (llama.cpp's add_bos), only
the second half scored (positions seqlen/2 .. seqlen-2 predict the next token, seqlen/2 - 1 per
chunk); ppl = exp(mean NLL), with llama.cpp's +/- from the per-token NLL variance.
The two are not comparable with each other; results carry their protocol's name. Logits are
formed in slices of positions so a 150k-token vocabulary never needs a (seqlen, V) fp32 tensor
per window at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
    raw = raw_text_file(dataset, req.data_file) if req.protocol == "llamacpp" else None
    if raw is not None:
        tokens = torch.tensor(list(loaded.tokenizer(_read_raw(raw), verbose=False).input_ids), dtype=torch.long)
    else:
        tokens = eval_tokens(loaded.tokenizer, dataset, data_file=req.data_file, seqlen=seqlen)
    start = time.perf_counter()
    result = perplexity(
        loaded.model, tokens, seqlen=seqlen, protocol=req.protocol,
        bos_id=bos_added(loaded.tokenizer), limit=req.limit, on_window=on_window,
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


_RAW_SUFFIXES = (".txt", ".raw", ".text", ".tokens")


def raw_text_file(dataset: str, data_file: str | None) -> Path | None:
    """The local text file llama-perplexity would read for this dataset (None: no such file)."""
    for cand in (data_file, dataset):
        if cand and Path(cand).expanduser().is_file() and Path(cand).suffix.lower() in _RAW_SUFFIXES:
            return Path(cand).expanduser()
    return None


def _read_raw(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InfqError(f"{path} is not valid UTF-8 ({exc.reason} at byte {exc.start}); re-encode it") from None


def bos_added(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer puts one in front of a text (llama.cpp's add_bos), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = list(tokenizer("a", verbose=False).input_ids)
    return bos if ids and ids[0] == bos else None
