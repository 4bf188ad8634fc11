"""infq and llama.cpp on each other's GGUF files (skipped where no llama.cpp build is present).

Needs a llama.cpp build (`$INFQ_LLAMACPP`, default /work/peers/llamacpp: build/bin/llama-* and
convert_hf_to_gguf.sh, see bench/gguf_llamacpp.py); CI has none. Oracles: llama.cpp's own
tokenizer (`llama-tokenize`) and `llama-perplexity`. Tolerance for perplexity: 0.5 % relative —
llama.cpp multiplies F16 weights with fp16 activations and block weights with 8-bit-quantized
activations (Q8_K/Q8_0), infq decodes the blocks exactly and multiplies in float32.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("INFQ_LLAMACPP", "/work/peers/llamacpp"))
BIN = ROOT / "build" / "bin"
pytestmark = pytest.mark.skipif(not (BIN / "llama-perplexity").is_file() or not (ROOT / "convert_hf_to_gguf.sh").is_file(),
                                reason="no llama.cpp build (set INFQ_LLAMACPP)")


def _run(*cmd: object) -> str:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout + out.stderr


def _llama_ppl(model: Path, text: Path, ctx: int) -> float:
    for _ in range(3):  # llama-perplexity has ended (exit 0) before its last chunks and final line: rerun
        log = _run(BIN / "llama-perplexity", "-m", model, "-f", text, "-c", ctx, "-t", "2", "--no-warmup")
        m = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
        if m is not None:
            break
    assert m is not None, log[-1500:]
    return float(m.group(1))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from infq.formats.hf import demo_model_path

    d = tmp_path_factory.mktemp("llamacpp")
    f16 = d / "lc-f16.gguf"
    _run(ROOT / "convert_hf_to_gguf.sh", demo_model_path(), "--outfile", f16, "--outtype", "f16")
    _run(BIN / "llama-quantize", f16, d / "lc-q4km.gguf", "Q4_K_M", "2")
    import sysconfig

    src = Path(sysconfig.get_paths()["stdlib"])
    text = (src / "argparse.py").read_text()[:40000]  # Python source, like the demo model's training text
    (d / "text.txt").write_text(text)
    return {"f16": f16, "q4km": d / "lc-q4km.gguf", "text": d / "text.txt", "dir": d}


def test_tokenizer_equals_llama_tokenize(files) -> None:
    from infq.formats.gguf_reader import GGUFFile

    want = ast.literal_eval(_run(BIN / "llama-tokenize", "-m", files["f16"], "-f", files["text"], "--ids", "--no-escape",
                                 "--log-disable").strip().splitlines()[-1])
    text = files["text"].read_bytes().decode()
    assert GGUFFile(files["f16"]).tokenizer()(text).input_ids == want


@pytest.mark.parametrize("name", ["f16", "q4km"])
def test_eval_equals_llama_perplexity_on_llamacpp_files(files, name: str) -> None:
    from infq.eval.perplexity import EvalRequest, evaluate_ppl

    r = evaluate_ppl(EvalRequest(str(files[name]), str(files["text"]), protocol="llamacpp", seqlen=256))
    assert r["format"] == "gguf"
    assert r["ppl"] == pytest.approx(_llama_ppl(files[name], files["text"], 256), rel=5e-3)


def test_llamacpp_loads_infq_q4km_and_scores_the_same(files) -> None:
    from infq.eval.perplexity import EvalRequest, evaluate_ppl
    from infq.formats.gguf_convert import convert_to_gguf

    out = files["dir"] / "infq-q6k.gguf"
    convert_to_gguf("demo", str(out), "Q6_K", force=True)
    r = evaluate_ppl(EvalRequest(str(out), str(files["text"]), protocol="llamacpp", seqlen=256))
    assert r["ppl"] == pytest.approx(_llama_ppl(out, files["text"], 256), rel=5e-3)


def test_special_tokens_in_text_equal_llama_tokenize(tmp_path) -> None:
    """Control and user-defined tokens inside the text: with and without parse_special, against
    `llama-tokenize` (which parses them unless --no-parse-special) on the demo vocab with four
    normal tokens turned into specials."""
    import json

    from safetensors.torch import load_file

    from infq.formats.gguf import write_gguf
    from infq.formats.gguf_reader import GGUFFile
    from infq.formats.gguf_vocab import tokenizer_metadata
    from infq.formats.hf import demo_model_path

    demo = demo_model_path()
    config = json.loads((demo / "config.json").read_text())
    tok, _ = tokenizer_metadata(demo, config["vocab_size"])
    tokens, types = list(tok["tokens"]), list(tok["token_type"])
    for i, (text, kind) in enumerate({"<|im_start|>": 3, "<|im_end|>": 3, "<tool>": 4, "<tool></tool>": 4}.items()):
        tokens[4000 + i], types[4000 + i] = text, kind
    tok = {**tok, "tokens": tokens, "token_type": types}
    path = tmp_path / "specials.gguf"
    write_gguf(path, config, load_file(demo / "model.safetensors"), "F16", tokenizer=tok)
    text = "<|im_start|>user\nHello <tool></tool> and <tool>x<|im_end|>\n<|im_start|>assistant\n def f(a):<s>"
    (tmp_path / "t.txt").write_text(text)
    spm = GGUFFile(path).tokenizer()
    for parse, flags in ((True, []), (False, ["--no-parse-special"])):
        want = ast.literal_eval(_run(BIN / "llama-tokenize", "-m", path, "-f", tmp_path / "t.txt", "--ids", "--no-escape",
                                     "--log-disable", *flags).strip().splitlines()[-1])
        assert spm(text, parse_special=parse).input_ids == want, parse
