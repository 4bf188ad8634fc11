"""`infq convert --to gguf / --to hf`, `infq inspect` and `infq eval --protocol llamacpp` on GGUF files.

Oracles: the original fp16 demo model (an F16 GGUF and the HF folder converted back from it hold the
same fp16 values, so logits agree to float32 summation order, 1e-4); transformers' forward for the
llama.cpp perplexity protocol written out here (BOS in front of each 512-token chunk, the second
half scored), on the same token ids; gguf-py's reader for the converted file's types.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from clitools import error_line, invoke, last_json
from tinymodels import make_tiny_model

from infq.formats.hf import demo_model_path


@pytest.fixture(scope="module")
def demo_f16(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "demo-f16.gguf"
    r = last_json(invoke("convert", "demo", "--to", "gguf", "--type", "f16", "--out", out, "--json"))
    assert r["types"] == {"F16": 30, "F32": 9} and r["tensors"] == 39
    return out


def test_f16_gguf_round_trips_to_hf(demo_f16: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from infq.runtime.loader import load_model

    hf = tmp_path / "hf"
    r = last_json(invoke("convert", demo_f16, "--to", "hf", "--out", hf, "--json"))
    assert r["warnings"] == [] and (hf / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32).eval()
    tok, orig_tok = AutoTokenizer.from_pretrained(hf), AutoTokenizer.from_pretrained(demo_model_path())
    text = "import os\n\ndef main(argv):\n    return os.path.join(*argv)\n"
    assert tok(text).input_ids == orig_tok(text).input_ids
    ids = torch.tensor([orig_tok(text).input_ids])
    with torch.no_grad():
        want = original(ids).logits
        converted = model(ids).logits
    torch.testing.assert_close(converted, want, atol=1e-4, rtol=0)
    gguf_logits = load_model(str(demo_f16)).model(ids)
    torch.testing.assert_close(gguf_logits, want, atol=1e-4, rtol=0)
    assert "exists" in error_line(invoke("convert", demo_f16, "--to", "hf", "--out", hf))


def test_quantized_gguf_to_hf_matches_the_runtime(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from infq.runtime.loader import load_model

    src = make_tiny_model(tmp_path / "tiny", hidden_size=256, intermediate_size=512)
    q = tmp_path / "tiny-q.gguf"
    r = last_json(invoke("convert", src, "--to", "gguf", "--type", "Q4_K_M", "--out", q, "--json"))
    assert r["file_type"] == 15 and set(r["types"]) <= {"F32", "Q4_K", "Q6_K", "Q5_0", "Q8_0"}
    assert any("tokenizer" in w for w in r["warnings"]) or r["tokenizer"] is not None
    hf = tmp_path / "tiny-hf"
    r = last_json(invoke("convert", q, "--to", "hf", "--out", hf, "--json"))
    assert any("blocks" in w for w in r["warnings"])
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 7, 99, 250, 3, 18]])
    with torch.no_grad():
        want = model(ids).logits
    got = load_model(str(q), tokenizer=False).model(ids)
    # the HF folder holds the blocks' decoding rounded to fp16: a few fp16 ulps on the logits
    torch.testing.assert_close(got, want, atol=2e-3 * float(want.abs().max()), rtol=0)


def test_inspect_gguf(demo_f16: Path) -> None:
    info = last_json(invoke("inspect", demo_f16, "--json"))
    assert info["format"] == "gguf" and info["quantization"]["file_type"] == "F16"
    assert info["parameters"] == 5_245_184 and info["layers"] == 4 and info["vocab_size"] == 4096
    assert info["bits_per_weight"] == pytest.approx(8 * info["tensor_bytes"] / info["parameters"])
    names = {t["name"] for t in info["tensors"]}
    assert "model.layers.3.mlp.down_proj.weight" in names and len(names) == 39


def test_convert_refusals(demo_f16: Path, tmp_path: Path) -> None:
    assert "--type" in error_line(invoke("convert", "demo", "--to", "gguf", "--out", tmp_path / "x.gguf"))
    assert "unknown" in error_line(invoke("convert", "demo", "--to", "gguf", "--type", "Q9_K", "--out", tmp_path / "x.gguf"))
    assert "already GGUF" in error_line(invoke("convert", demo_f16, "--to", "gguf", "--type", "q8_0", "--out", tmp_path / "y.gguf"))
    assert "--type applies" in error_line(invoke("convert", demo_f16, "--to", "hf", "--type", "q8_0", "--out", tmp_path / "z"))
    assert "not a GGUF" in error_line(invoke("convert", "demo", "--to", "hf", "--out", tmp_path / "z"))
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "z").exists()


def test_packed_checkpoint_converts_with_a_lossy_warning(tmp_path: Path) -> None:
    from infq.quantizers.api import QuantizeRequest, quantize_model

    src = make_tiny_model(tmp_path / "tiny")
    gptq = tmp_path / "tiny-rtn"
    quantize_model(QuantizeRequest(model=str(src), method="rtn", bits=4, group_size=32, out=str(gptq)))
    r = last_json(invoke("convert", gptq, "--to", "gguf", "--type", "Q8_0", "--out", tmp_path / "t.gguf", "--json"))
    assert r["lossy"] and "loses accuracy" in r["warnings"][0] and r["from"] == "gptq"
    from infq.formats.gguf_reader import GGUFFile
    from infq.runtime.loader import load_model

    f = GGUFFile(tmp_path / "t.gguf")
    assert f.ggml_type("model.layers.0.mlp.down_proj.weight") == "Q8_0"
    # Q8_0 of the 4-bit weights: within Q8_0's half step (amax/254 per 32-block) of the GPTQ weights
    w = load_model(str(gptq), tokenizer=False).model.blocks[0].linears["down"].weight
    back = f.dense("model.layers.0.mlp.down_proj.weight")
    step = w.abs().reshape(w.shape[0], -1, 32).amax(-1, keepdim=True) / 127
    assert bool(((back - w).abs().reshape(w.shape[0], -1, 32) <= step / 2 + 1e-3 * step).all())


def test_llamacpp_protocol_matches_a_written_out_oracle(demo_f16: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "".join(Path(demo_model_path(), "TRAINING.md").read_text() for _ in range(3)) + "\r\nend\n"
    (tmp_path / "t.txt").write_bytes(text.encode())
    r = last_json(invoke("eval", demo_f16, "--ppl", tmp_path / "t.txt", "--protocol", "llamacpp", "--seqlen", "128",
                         "--json"))
    tok = AutoTokenizer.from_pretrained(demo_model_path())
    model = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32).eval()
    ids = tok(text).input_ids  # whole file, bytes as they are ("\r\n" kept), BOS in front
    n = len(ids) // 128
    nll = []
    for i in range(n):
        chunk = torch.tensor([ids[i * 128:(i + 1) * 128]])
        chunk[0, 0] = tok.bos_token_id
        with torch.no_grad():
            logp = torch.log_softmax(model(chunk).logits[0].double(), -1)
        nll += [-float(logp[p, chunk[0, p + 1]]) for p in range(64, 127)]
    assert r["windows"] == n and r["scored"] == len(nll) == 63 * n and r["dataset_tokens"] == len(ids)
    assert r["ppl"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
