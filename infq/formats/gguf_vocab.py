"""Tokenizer metadata for a GGUF file, built from a Hugging Face model folder (writer side).

`tokenizer_metadata(model_dir, vocab_size)` returns the mapping `formats.gguf` writes under
llama.cpp's `tokenizer.ggml.*` keys (reference §A.4.2, gguf-py's constants), plus warnings:

* byte-level BPE (`tokenizer.json`, a ByteLevel pre-tokenizer or decoder; GPT-2, Llama 3, Qwen2):
  model "gpt2", tokens, token types, merges as "left right", and `pre`, the pre-tokenizer name
  llama.cpp keys its split regex on: "llama-bpe" for Llama 3's regex (digits in runs of up to three),
  "qwen2" for Qwen2's (single digits), "gpt-2" for ByteLevel's built-in regex, else "default" with a
  warning (llama.cpp names pre-tokenizers by hashing their output, which infq does not reproduce);
* SentencePiece-style tokenizers: a `tokenizer.json` BPE over "▁" with byte fallback (the demo
  model, Llama 2, Mistral) or a Unigram model, or a `tokenizer.model` read with `sentencepiece`
  when it is installed: model "llama", tokens, scores, token types, `add_space_prefix`. llama.cpp's
  "llama" tokenizer merges the adjacent pair whose joined text has the highest score, so a BPE's
  merge of rank r gives its result the score -r (earlier merges win, as in BPE); the merges are
  written too (llama.cpp ignores them for "llama"; transformers' GGUF loader uses them). Unigram
  and sentencepiece scores are written as they are.
Token types: BYTE for `<0xXX>` pieces of a byte-fallback vocabulary, CONTROL for special added
tokens, UNKNOWN for the unk token, USER_DEFINED for non-special added tokens, UNUSED for ids
padded up to the model's vocab size (as `[PADi]`). Special ids come from tokenizer_config.json (else
config.json / generation_config.json), add_bos/add_eos from tokenizer_config.json or the
post-processor, the chat template from tokenizer_config.json or chat_template.jinja.
Limits: WordLevel/WordPiece tokenizers and tiktoken files are not converted (the caller warns that
the file then needs an external tokenizer).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType values
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _components(obj: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A normalizer/pre-tokenizer/decoder and, for a Sequence, its parts, flattened."""
    if not obj:
        return []
    parts = obj.get("normalizers") or obj.get("pretokenizers") or obj.get("decoders")
    return [c for p in parts for c in _components(p)] if parts else [obj]


def tokenizer_metadata(model_dir: Path, vocab_size: int | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """(metadata for formats.gguf's writer or None, warnings) for the tokenizer in `model_dir`."""
    tj = model_dir / "tokenizer.json"
    if tj.is_file():
        meta, warnings = _from_tokenizer_json(_read_json(tj))
    elif (model_dir / "tokenizer.model").is_file():
        meta, warnings = _from_sentencepiece(model_dir / "tokenizer.model")
    else:
        meta, warnings = None, [f"{model_dir} has no tokenizer.json or tokenizer.model"]
    if meta is None:
        return None, [*warnings, "no tokenizer metadata written: the GGUF needs an external tokenizer"]
    _pad(meta, vocab_size)
    _specials(meta, model_dir)
    return meta, warnings


def _from_tokenizer_json(tj: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    model = tj.get("model") or {}
    kind = model.get("type")
    tokens, types = _id_table(model, tj.get("added_tokens") or [])
    if tokens is None:
        return None, [f"tokenizer.json model {kind!r} has ids with no token; not converted"]
    pre = [c.get("type") for c in _components(tj.get("pre_tokenizer"))]
    dec = [c.get("type") for c in _components(tj.get("decoder"))]
    if kind == "BPE" and ("ByteLevel" in pre or "ByteLevel" in dec):
        merges = _merges(model)
        name, warn = _bpe_pre(tj)
        return {"model": "gpt2", "pre": name, "tokens": tokens, "token_type": types, "merges": merges}, warn
    if kind == "BPE" and (model.get("byte_fallback") or _uses_metaspace(tj)):
        merges = _merges(model)
        scores = [0.0] * len(tokens)
        index = {t: i for i, t in enumerate(tokens)}
        seen: set[int] = set()
        for rank, m in enumerate(merges):  # the result of merge r scores -r (first merge wins)
            i = index.get(m.replace(" ", "", 1))
            if i is not None and i not in seen:
                seen.add(i)
                scores[i] = -float(rank)
        types = [BYTE if t == NORMAL and _BYTE_PIECE.fullmatch(tok) else t for tok, t in zip(tokens, types, strict=True)]
        return {"model": "llama", "pre": "default", "tokens": tokens, "scores": scores, "token_type": types,
                "merges": merges, "add_space_prefix": _uses_metaspace(tj)}, []
    if kind == "Unigram":
        scores = [0.0] * len(tokens)
        for i, (_, score) in enumerate(model.get("vocab") or []):
            scores[i] = float(score)
        types = [BYTE if t == NORMAL and _BYTE_PIECE.fullmatch(tok) else t for tok, t in zip(tokens, types, strict=True)]
        return {"model": "llama", "pre": "default", "tokens": tokens, "scores": scores, "token_type": types,
                "add_space_prefix": _uses_metaspace(tj)}, []
    return None, [f"tokenizer.json model {kind!r} (pre-tokenizers {pre}) is neither byte-level BPE nor "
                  "SentencePiece-style"]


def _id_table(model: dict[str, Any], added: list[dict[str, Any]]) -> tuple[list[str] | None, list[int]]:
    """Tokens by id and their types, the model's vocabulary plus added tokens."""
    vocab = model.get("vocab") or {}
    by_id: dict[int, str] = {}
    if isinstance(vocab, dict):
        by_id = {int(i): t for t, i in vocab.items()}
    else:  # Unigram: [[piece, score], ...] in id order
        by_id = {i: entry[0] for i, entry in enumerate(vocab)}
    kinds = dict.fromkeys(by_id, NORMAL)
    unk = model.get("unk_token")
    unk_id = model.get("unk_id")
    for a in added:
        i = int(a["id"])
        by_id[i] = a["content"]
        kinds[i] = CONTROL if a.get("special") else USER_DEFINED
    for i, t in by_id.items():
        if t == unk or i == unk_id:
            kinds[i] = UNKNOWN
    n = max(by_id, default=-1) + 1
    if len(by_id) != n:
        return None, []
    return [by_id[i] for i in range(n)], [kinds[i] for i in range(n)]


def _merges(model: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]


def _uses_metaspace(tj: dict[str, Any]) -> bool:
    """True when the text gets a leading "▁" (SentencePiece's add_dummy_prefix)."""
    for c in _components(tj.get("normalizer")):
        if c.get("type") == "Prepend" and c.get("prepend") == "\u2581":
            return True
    for c in _components(tj.get("pre_tokenizer")):
        if c.get("type") == "Metaspace":
            return c.get("prepend_scheme", "always") != "never" and c.get("add_prefix_space", True)
    return False


def _bpe_pre(tj: dict[str, Any]) -> tuple[str, list[str]]:
    """llama.cpp's pre-tokenizer name for a byte-level BPE, from its split regex."""
    for c in _components(tj.get("pre_tokenizer")):
        if c.get("type") == "Split":
            regex = (c.get("pattern") or {}).get("Regex", "")
            contractions = "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in regex
            if contractions and r"\p{N}{1,3}" in regex:
                return "llama-bpe", []
            if contractions and r"\p{N}" in regex:
                return "qwen2", []
            return "default", ["byte-level BPE with an unrecognised split regex: written with pre-tokenizer "
                               "'default'; llama.cpp may split text differently from transformers"]
        if c.get("type") == "ByteLevel" and c.get("use_regex", True):
            return "gpt-2", []
    return "default", ["byte-level BPE without a split regex: written with pre-tokenizer 'default'"]


def _from_sentencepiece(path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    try:
        import sentencepiece
    except ImportError:
        return None, [f"{path.name} needs the sentencepiece package to be read; pip install sentencepiece"]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else UNUSED if sp.is_unused(i)
                     else BYTE if sp.is_byte(i) else NORMAL)
    return {"model": "llama", "pre": "default", "tokens": tokens, "scores": scores, "token_type": types,
            "add_space_prefix": True}, []


def _pad(meta: dict[str, Any], vocab_size: int | None) -> None:
    """Pad to the model's embedding rows with [PADi] (UNUSED), as llama.cpp's converter does."""
    n = len(meta["tokens"])
    if vocab_size is None or vocab_size <= n:
        return
    meta["tokens"] = [*meta["tokens"], *(f"[PAD{i}]" for i in range(n, vocab_size))]
    meta["token_type"] = [*meta["token_type"], *[UNUSED] * (vocab_size - n)]
    if meta.get("scores") is not None:
        meta["scores"] = [*meta["scores"], *[-1000.0] * (vocab_size - n)]


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _specials(meta: dict[str, Any], model_dir: Path) -> None:
    """bos/eos/unk/pad ids, add_bos/add_eos and the chat template."""
    tc = _read_json(model_dir / "tokenizer_config.json")
    cfg = {**_read_json(model_dir / "config.json"), **_read_json(model_dir / "generation_config.json")}
    index = {t: i for i, t in enumerate(meta["tokens"])}
    for key in ("bos", "eos", "unk", "pad"):
        text = _token_text(tc.get(f"{key}_token"))
        tid: Any = index.get(text) if text is not None else None
        if tid is None:
            fallback = cfg.get(f"{key}_token_id")
            tid = fallback[0] if isinstance(fallback, list) and fallback else fallback
        if isinstance(tid, int) and 0 <= tid < len(meta["tokens"]):
            meta[f"{key}_token_id"] = tid
    post = _read_json(model_dir / "tokenizer.json").get("post_processor") or {}
    single = post.get("single") or []  # TemplateProcessing: [{"SpecialToken": {"id": "<s>"}}, {"Sequence": ...}]
    first = (single[0].get("SpecialToken") or {}).get("id") if single else None
    last = (single[-1].get("SpecialToken") or {}).get("id") if single else None
    bos = meta["tokens"][meta["bos_token_id"]] if "bos_token_id" in meta else None
    eos = meta["tokens"][meta["eos_token_id"]] if "eos_token_id" in meta else None
    meta["add_bos"] = bool(tc["add_bos_token"]) if "add_bos_token" in tc else bos is not None and first == bos
    meta["add_eos"] = bool(tc["add_eos_token"]) if "add_eos_token" in tc else eos is not None and last == eos
    template = tc.get("chat_template")
    jinja = model_dir / "chat_template.jinja"
    if isinstance(template, str):
        meta["chat_template"] = template
    elif jinja.is_file():
        meta["chat_template"] = jinja.read_text(encoding="utf-8")
