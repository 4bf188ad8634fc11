"""GGUF reading for the runtime: the SPM tokenizer, the HF tokenizer it saves, bad files.

Oracles: a naive re-statement of llama.cpp's SPM rule (repeatedly merge the adjacent pair whose
joined text is a token with the highest score, leftmost on ties; unknown characters as bytes),
written here as an O(n^2) loop; the original Hugging Face tokenizer of the demo model for a GGUF
whose vocab infq wrote (merge-rank scores); gguf-py's writer for the malformed files.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from infq.errors import InfqError
from infq.formats.gguf_reader import GGUFFile
from infq.formats.gguf_tokenizer import SpmTokenizer, save_hf_tokenizer


def naive_spm(tokens: list[str], scores: list[float], text: str, byte_base: int) -> list[int]:
    ids = {t: i for i, t in reversed(list(enumerate(tokens)))}
    syms = list((" " + text).replace(" ", "\u2581"))
    while True:
        best = None
        for k in range(len(syms) - 1):
            j = syms[k] + syms[k + 1]
            if j in ids and (best is None or scores[ids[j]] > scores[ids[best[1]]]):
                best = (k, j)
        if best is None:
            break
        syms[best[0]:best[0] + 2] = [best[1]]
    out = []
    for s in syms:
        out += [ids[s]] if s in ids else [byte_base + b for b in s.encode()]
    return out


def _vocab(seed: int, tied: bool) -> tuple[list[str], list[float]]:
    rng = random.Random(seed)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list("abcde\u2581")
    while len(tokens) < 330:
        t = "".join(rng.choice("abcde\u2581") for _ in range(rng.randint(2, 4)))
        if t not in tokens:
            tokens.append(t)
    scores = [0.0] * 259 + [(-1000.0 if tied else -float(rng.randint(0, 40))) for _ in tokens[259:]]
    return tokens, scores


@pytest.mark.parametrize("tied", [False, True])
def test_spm_tokenizer_follows_the_llamacpp_rule(tied: bool) -> None:
    tokens, scores = _vocab(0, tied)
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)
    tok = SpmTokenizer(tokens, scores, types, bos=1, eos=2, unk=0)
    rng = random.Random(1)
    for _ in range(200):
        text = "".join(rng.choice("abcde xé") for _ in range(rng.randint(0, 30)))
        want = ([1] + naive_spm(tokens, scores, text, 3)) if text else [1]
        assert tok(text).input_ids == want, text
        assert tok.decode(want, skip_special_tokens=True) == text


def _demo_gguf(tmp_path: Path) -> Path:
    """The demo model's vocab and a one-layer slice of its weights, written by infq (F16)."""
    import json

    from infq.formats.gguf import write_gguf
    from infq.formats.gguf_vocab import tokenizer_metadata
    from infq.formats.hf import Checkpoint, demo_model_path

    src = demo_model_path()
    cfg = {**json.loads((src / "config.json").read_text()), "num_hidden_layers": 1, "rope_theta": 10000.0}
    ck = Checkpoint(src)
    tensors = {k: ck.get(k) for k in ck.keys() if not k.startswith("model.layers.") or k.startswith("model.layers.0.")}
    tok, _ = tokenizer_metadata(src, cfg["vocab_size"])
    write_gguf(tmp_path / "demo.gguf", cfg, tensors, "F16", tokenizer=tok)
    return tmp_path / "demo.gguf"


def test_gguf_tokenizers_equal_the_original_on_infq_files(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from infq.formats.hf import demo_model_path

    f = GGUFFile(_demo_gguf(tmp_path))
    original = AutoTokenizer.from_pretrained(demo_model_path())
    save_hf_tokenizer(f.path, f.meta, tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    spm = f.tokenizer()
    text = "def f(x):\n    return  x ** 2  # caf\u00e9 \u65e5\u672c\n\n\tclass A: pass"
    want = original(text).input_ids
    assert spm(text).input_ids == want
    assert saved(text).input_ids == want
    assert saved.decode(want, skip_special_tokens=True) == original.decode(want, skip_special_tokens=True)


def _write(path: Path, arch: str = "llama", n_extra: int = 0) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    for i in range(n_extra):
        w.add_uint32(f"x.{i}", i)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _one_line(exc: pytest.ExceptionInfo[InfqError]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and len(msg) < 300
    return msg


def test_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(InfqError, match="architecture 'gpt2'") as e:
        GGUFFile(_write(tmp_path / "a.gguf", "gpt2"))
    _one_line(e)
    good = _write(tmp_path / "b.gguf").read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(good[: len(good) - 100])
    with pytest.raises(InfqError, match="truncated|past the end|not a readable") as e:
        GGUFFile(tmp_path / "trunc.gguf")
    _one_line(e)
    (tmp_path / "magic.gguf").write_bytes(b"GGUX" + good[4:])
    with pytest.raises(InfqError, match="not a GGUF") as e:
        GGUFFile(tmp_path / "magic.gguf")
    _one_line(e)
    absurd = good[:8] + struct.pack("<Q", 2**62) + good[16:]
    (tmp_path / "absurd.gguf").write_bytes(absurd)
    with pytest.raises(InfqError, match="claims") as e:
        GGUFFile(tmp_path / "absurd.gguf")
    _one_line(e)
    with pytest.raises(InfqError, match="lacks metadata llama.attention.head_count") as e:
        GGUFFile(tmp_path / "b.gguf")
    _one_line(e)


def test_eval_cli_on_a_bad_gguf_exits_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from infq.cli.app import app

    path = _write(tmp_path / "a.gguf", "gpt2")
    (tmp_path / "bad.gguf").write_bytes(b"GGUX" + path.read_bytes()[4:])
    for args in (["eval", str(path), "--ppl", "demo"], ["inspect", str(path)], ["inspect", str(tmp_path / "bad.gguf")],
                 ["convert", str(path), "--to", "hf", "--out", str(tmp_path / "o")]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in result.output
