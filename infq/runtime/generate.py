"""Text in, text out over the engine: what `infq run` calls.

`open_engine` loads a checkpoint (any format `loader.py` reads) and builds an `Engine` over it;
`run_prompts` tokenizes prompts, queues them all (the engine batches them continuously), calls
`on_output` with every step's per-request output (for streaming), and returns one result dict per
prompt in order: the generated text and token ids, TTFT, tokens/s, or the error that rejected it.
`read_prompts` reads a prompts file (.txt: one prompt per line; .jsonl: a `prompt` or `text` field,
or `messages`, a conversation for the chat template, see `runtime.chat`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from infq.errors import InfqError
from infq.runtime.engine import Engine, EngineConfig, RequestOutput
from infq.runtime.sampling import SamplingParams


def eos_ids(loaded: Any) -> list[int]:
    """End-of-sequence ids: config.json's and generation_config.json's (`formats.hf.end_token_ids`),
    the tokenizer's; for a GGUF also its end-of-turn / end-of-message ids (eot_token_id, eom_token_id)."""
    from infq.formats.hf import end_token_ids

    eos = loaded.config.eos_token_id
    ids = {eos} if isinstance(eos, int) else set(eos or ())
    path = Path(loaded.path)
    if path.is_dir():
        ids.update(end_token_ids(path, {}))
    ids.update(getattr(loaded, "extra_eos_ids", ()))
    tok = loaded.tokenizer
    if tok is not None and tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return sorted(ids)


def open_engine(model: str, config: EngineConfig, dtype: str = "auto", device: str = "cpu") -> tuple[Engine, Any]:
    """(engine, LoadedModel) for a model path, hub id or 'demo'."""
    from infq.runtime.loader import load_model

    loaded = load_model(model, dtype=dtype, device=device, serving=True)
    return Engine(loaded.model, config, eos_ids=eos_ids(loaded), tokenizer=loaded.tokenizer), loaded


Prompt = str | list[dict[str, Any]]  # text, or a conversation (chat messages)


def read_prompts(path: str | Path) -> list[Prompt]:
    from infq.runtime.chat import check_messages

    p = Path(path)
    if not p.is_file():
        raise InfqError(f"--prompts-file {p}: no such file")
    lines = p.read_text(encoding="utf-8").splitlines()
    if p.suffix == ".jsonl":
        prompts: list[Prompt] = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if isinstance(rec, dict) and "messages" in rec:
                    prompts.append(check_messages(rec["messages"], f"{p}:{i}"))
                else:
                    prompts.append(str(rec["prompt"] if "prompt" in rec else rec["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InfqError(f"{p}:{i}: expected a JSON object with a 'prompt', 'text' or 'messages' field") from None
    else:
        prompts = [ln for ln in lines if ln.strip()]
    if not prompts:
        raise InfqError(f"--prompts-file {p} holds no prompts")
    return prompts


def run_prompts(engine: Engine, prompts: Sequence[Prompt], max_new_tokens: int, params: SamplingParams, *,
                ignore_eos: bool = False, stop: Sequence[str] = (),
                on_output: Callable[[int, RequestOutput], None] | None = None,
                encode: Callable[[Prompt], list[int]] | None = None, n: int = 1,
                logprobs: int = 0) -> list[dict[str, Any]]:
    """Generate for every prompt through the batching engine; one result per prompt, in order
    (`n` > 1: n per prompt, parallel samples, each with `index` and `sample`). `encode` turns a
    prompt into token ids (default: the tokenizer, special tokens in the text parsed;
    `runtime.chat.ChatEncoder` for chat templates). `on_output` gets (prompt index, output)."""
    from infq.runtime.chat import encode_text

    if max_new_tokens < 1:
        raise InfqError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    if encode is None:
        def encode(prompt: Prompt) -> list[int]:
            if not isinstance(prompt, str):
                raise InfqError("a 'messages' prompt needs a chat template: pass --chat")
            return encode_text(engine.tokenizer, prompt)
    from infq.runtime.engine import SampleId

    for i, prompt in enumerate(prompts):
        engine.add_request(encode(prompt), params, max_new_tokens, stop=stop, ignore_eos=ignore_eos, request_id=i,
                           n=n, logprobs=logprobs)
    results: dict[tuple[int, int], dict[str, Any]] = {}
    for outs in engine.stream():
        for out in outs:
            i = out.request_id.parent if isinstance(out.request_id, SampleId) else out.request_id
            if on_output is not None:
                on_output(i, out)
            if out.finished:
                res = _result(prompts[i], out)
                if n > 1:
                    res = {"index": i, "sample": out.sample_index, **res}
                results[i, out.sample_index] = res
    return [results[i, j] for i in range(len(prompts)) for j in range(n) if (i, j) in results]


def _result(prompt: Prompt, out: RequestOutput) -> dict[str, Any]:
    if out.error is not None:
        return {"prompt": prompt, "error": out.error}
    return {
        "prompt": prompt, "text": out.text, "token_ids": out.token_ids, "prompt_tokens": out.prompt_tokens,
        "cached_tokens": out.cached_tokens, "finish_reason": out.finish_reason, "ttft_s": out.ttft_s,
        "tokens_per_s": out.tokens_per_s, "e2e_s": out.e2e_s,
        **({"logprobs": out.logprobs, "cumulative_logprob": sum(e["logprob"] for e in out.logprobs)}
           if out.logprobs is not None else {}),
    }
