"""Tokenizer metadata in GGUF files: written, read back with gguf-py, and turned back into a working
tokenizer by transformers' own GGUF loader, which must give the original tokenizer's ids.

For the SentencePiece-style ("llama") vocabulary a second oracle is a plain-Python version of
llama.cpp's "llama" tokenizer rule (repeatedly merge the adjacent pair whose joined text is a token
with the highest score, leftmost on ties; unknown characters fall back to <0xXX> bytes), which must
reproduce the original BPE's ids from the written scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from infq.formats.gguf import write_gguf
from infq.formats.gguf_vocab import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, tokenizer_metadata
from infq.formats.hf import demo_model_path

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

TEXTS = ["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)", "import os, sys  # héllo ∑ 日本\t!",
         "The quick brown fox jumps over the lazy dog 12345."]


def _write(tmp_path: Path, meta: dict, hidden: int = 64) -> Path:
    cfg = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": 1, "num_attention_heads": 1,
           "intermediate_size": hidden, "rms_norm_eps": 1e-5, "max_position_embeddings": 64,
           "vocab_size": len(meta["tokens"])}
    path = tmp_path / "v.gguf"
    write_gguf(path, cfg, {"model.norm.weight": torch.ones(hidden)}, "F32", tokenizer=meta)
    return path


def _field(reader, key):
    return reader.fields[key].contents()


def _spm_like_llama_cpp(text: str, tokens: list[str], scores: list[float]) -> list[int]:
    """llama.cpp's SPM merge rule over the written tokens and scores (add_space_prefix on)."""
    index = {t: i for i, t in enumerate(tokens)}
    symbols = list("\u2581" + text.replace(" ", "\u2581"))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            j = index.get(symbols[i] + symbols[i + 1])
            if j is not None and (best is None or scores[j] > best[0]):
                best = (scores[j], i)
        if best is None:
            break
        i = best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    ids = []
    for s in symbols:
        if s in index:
            ids.append(index[s])
        else:
            ids += [index[f"<0x{b:02X}>"] for b in s.encode("utf-8")]
    return ids


def test_demo_sentencepiece_style_vocab(tmp_path: Path) -> None:
    demo = demo_model_path()
    meta, warnings = tokenizer_metadata(demo, 4096)
    assert warnings == [] and meta["model"] == "llama"
    path = _write(tmp_path, meta)
    r = gguf.GGUFReader(path)
    tj = json.loads((demo / "tokenizer.json").read_text())
    vocab = {i: t for t, i in tj["model"]["vocab"].items()}
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert tokens == [vocab[i] for i in range(4096)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    assert _field(r, "tokenizer.ggml.merges") == merges
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[:4] == [UNKNOWN, CONTROL, CONTROL, BYTE] and types[3 + 255] == BYTE and types[3 + 256] == NORMAL
    assert (_field(r, "tokenizer.ggml.model"), _field(r, "tokenizer.ggml.bos_token_id"),
            _field(r, "tokenizer.ggml.eos_token_id"), _field(r, "tokenizer.ggml.add_bos_token"),
            _field(r, "tokenizer.ggml.add_space_prefix")) == ("llama", 1, 2, True, True)
    orig = transformers.AutoTokenizer.from_pretrained(demo)
    back = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    scores = _field(r, "tokenizer.ggml.scores")
    for text in TEXTS:  # transformers' GGUF llama tokenizer differs only on text opening with spaces
        ids = orig(text, add_special_tokens=False)["input_ids"]  # BOS: the add_bos_token flag, checked above
        assert back(text, add_special_tokens=False)["input_ids"] == ids
        assert _spm_like_llama_cpp(text, tokens, scores) == ids


def _byte_level_model_dir(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [t * 20 for t in TEXTS] + [Path(json.__file__).read_text()]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>", pad_token="<|pad|>")
    d = tmp_path / "bpe"
    fast.save_pretrained(d)
    return d


def test_byte_level_bpe_vocab(tmp_path: Path) -> None:
    d = _byte_level_model_dir(tmp_path)
    meta, warnings = tokenizer_metadata(d, 640)  # padded to the model's 640 embedding rows
    assert warnings == [] and (meta["model"], meta["pre"]) == ("gpt2", "gpt-2")
    path = _write(tmp_path, meta)
    r = gguf.GGUFReader(path)
    tj = json.loads((d / "tokenizer.json").read_text())
    vocab = {i: t for t, i in tj["model"]["vocab"].items()}
    n = len(vocab)
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert tokens[:n] == [vocab[i] for i in range(n)] and tokens[n:] == [f"[PAD{i}]" for i in range(n, 640)]
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[0] == CONTROL and types[5] == NORMAL and set(types[n:]) == {UNUSED}
    assert _field(r, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    assert _field(r, "tokenizer.ggml.padding_token_id") == 1
    orig = transformers.AutoTokenizer.from_pretrained(d)
    back = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        assert back(text, add_special_tokens=False)["input_ids"] == orig(text, add_special_tokens=False)["input_ids"]


def test_unconvertible_tokenizer_warns(tmp_path: Path, tiny_tokenizer) -> None:
    tiny_tokenizer.save_pretrained(tmp_path / "wl")  # WordLevel: neither BPE nor SentencePiece
    meta, warnings = tokenizer_metadata(tmp_path / "wl", 320)
    assert meta is None and any("external tokenizer" in w for w in warnings)
    meta, warnings = tokenizer_metadata(tmp_path, 320)
    assert meta is None and "no tokenizer.json" in warnings[0]


def test_sentencepiece_model_file(tmp_path: Path) -> None:
    """A tokenizer.model (SentencePiece BPE with byte fallback, trained here): pieces, scores and types
    as sentencepiece reports them, and llama.cpp's merge rule over them gives sentencepiece's ids.
    Runs where the sentencepiece package is installed."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(t for t in TEXTS * 30) + "\n" + Path(json.__file__).read_text())
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=500,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    d = tmp_path / "m"
    d.mkdir()
    (d / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "unk_token": "<unk>", "add_bos_token": True}))
    meta, warnings = tokenizer_metadata(d, 500)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    assert warnings == [] and meta["model"] == "llama"
    r = gguf.GGUFReader(_write(tmp_path, meta))
    tokens, scores = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.scores")
    assert tokens == [sp.id_to_piece(i) for i in range(500)]
    assert scores == pytest.approx([sp.get_score(i) for i in range(500)])
    types = _field(r, "tokenizer.ggml.token_type")
    assert (types[sp.unk_id()], types[sp.bos_id()], types[sp.piece_to_id("<0x41>")]) == (UNKNOWN, CONTROL, BYTE)
    assert (_field(r, "tokenizer.ggml.bos_token_id"), _field(r, "tokenizer.ggml.add_bos_token")) == (sp.bos_id(), True)
    for text in TEXTS:
        assert _spm_like_llama_cpp(text, tokens, scores) == sp.encode(text)
