"""`infq quantize --method kquant` end to end on a tiny llama: the GGUF gguf-py reads holds, for every
tensor, exactly the bytes of our QuantizedTensor (the independent check: gguf-py's dequantizer of the
file's data equals our decoder of a re-encoding from the HF weights, bit for bit, Q/K rows permuted as
llama.cpp's converter does), the mix's types with fallbacks for rows of 288, llama.cpp's file_type,
and the reported bits per weight recomputed from the file. Bad inputs give one `error:` line, exit 2.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from clitools import invoke
from tinymodels import make_tiny_model

from infq.formats.gguf import hf_name, permute_qk
from infq.formats.hf import Checkpoint
from infq.formats.imatrix import read_imatrix
from infq.quantizers.calibrate import LayerStats
from infq.quantizers.kquants import quantize_kquant
from infq.quantizers.scheme import QuantConfig

gguf = pytest.importorskip("gguf")
@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("kq")
    # rows of 256 (K-quant blocks fit) except ffn_down, whose rows of 288 force the fallbacks
    path = make_tiny_model(d / "m", hidden_size=256, intermediate_size=288, num_attention_heads=4,
                           num_key_value_heads=2)
    text = d / "text.txt"
    text.write_text("\n".join(f"line {i} of some text to calibrate on, with words." for i in range(300)))
    return path, text


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_q4_k_m_end_to_end(model_and_data, tmp_path):
    path, text = model_and_data
    common = ("quantize", "--model", path, "--method", "kquant", "--type", "Q4_K_M", "--dataset", text,
              "--nsamples", 4, "--seqlen", 64)
    first = _json(invoke(*common, "--imatrix-out", tmp_path / "im.gguf", "--out", tmp_path / "a.gguf", "--json"))
    assert first["imatrix"]["source"] == "collected" and first["imatrix"]["entries"] == 14
    out = tmp_path / "b.gguf"
    obj = _json(invoke(*common, "--imatrix", tmp_path / "im.gguf", "--out", out, "--json"))
    im = read_imatrix(tmp_path / "im.gguf")
    r = gguf.GGUFReader(out)
    assert r.fields["general.file_type"].contents() == 15 == obj["file_type"]
    assert r.fields["quantize.imatrix.entries_count"].contents() == 14
    types = {t.name: t.tensor_type.name for t in r.tensors}
    # 2 layers: use_more_bits(1, 2) -> layer 1's attn_v Q6_K; ffn_down rows of 288: Q4_K -> Q5_0, Q6_K -> Q8_0
    assert (types["blk.0.attn_v.weight"], types["blk.1.attn_v.weight"]) == ("Q4_K", "Q6_K")
    assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"]) == ("Q5_0", "Q8_0")
    assert (types["output.weight"], types["token_embd.weight"], types["blk.0.attn_norm.weight"]) == ("Q6_K", "Q4_K", "F32")
    assert {(f["tensor"], f["from"], f["to"]) for f in obj["fallbacks"]} == {
        ("blk.0.ffn_down.weight", "Q4_K", "Q5_0"), ("blk.1.ffn_down.weight", "Q6_K", "Q8_0")}
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    numel = sum(int(t.n_elements) for t in r.tensors)
    assert obj["bits_per_weight"] == pytest.approx(8 * nbytes / numel, abs=1e-4)
    ckpt = Checkpoint(path)
    cfg = QuantConfig(method="kquant", bits=4, group_size=-1)
    for t in r.tensors:
        hf = hf_name(t.name)
        w = ckpt.get(hf).float()
        if t.tensor_type.name == "F32":
            assert torch.equal(torch.from_numpy(np.array(t.data)).reshape(w.shape), w)
            continue
        st = LayerStats(w.shape[1])
        if t.name in im.sums:
            st.sqmean = im.mean(t.name)
        ours = quantize_kquant(w, st, cfg, t.tensor_type.name).dequantize()  # (out, in) HF row order
        if "attn_q" in t.name or "attn_k" in t.name:
            ours = permute_qk(ours, 4 if "attn_q" in t.name else 2)
        theirs = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(theirs)).reshape(ours.shape), ours), t.name


def test_no_imatrix_dat_and_override(model_and_data, tmp_path):
    path, _ = model_and_data
    out = tmp_path / "new" / "c.gguf"  # the folder is created
    obj = _json(invoke("quantize", "--model", path, "--method", "kquant", "--type", "q8_0", "--no-imatrix",
                       "--tensor-type", r"attn_v=Q6_K", "--out", out, "--json"))
    assert obj["imatrix"]["source"] is None and {o["tensor"] for o in obj["overrides"]} == {
        "blk.0.attn_v.weight", "blk.1.attn_v.weight"}
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_v.weight"] == "Q6_K" and types["blk.0.attn_q.weight"] == "Q8_0"
    assert "quantize.imatrix.entries_count" not in gguf.GGUFReader(out).fields


def _bad(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs(model_and_data, tmp_path):
    path, _ = model_and_data
    base = ("quantize", "--model", path, "--method", "kquant", "--out", tmp_path / "x.gguf")
    _bad(invoke(*base, "--type", "Q4_K_X"), "Q4_K_X", "Q4_K_M")
    _bad(invoke(*base, "--no-imatrix", "--tensor-type", "attn_(=Q4_K"), "regex", "invalid")
    _bad(invoke(*base, "--no-imatrix", "--tensor-type", "attn_q=Q9_K"), "Q9_K", "not supported")
    # overrides skip tensors that took a fallback (llama.cpp); under Q8_0 ffn_down fits and the override does not
    _bad(invoke(*base, "--type", "Q8_0", "--no-imatrix", "--tensor-type", "ffn_down=Q4_K"), "ffn_down", "block of 256")
    _bad(invoke(*base, "--imatrix", tmp_path / "i.dat", "--no-imatrix"), "contradict")
    _bad(invoke(*base, "--bits", 4), "--bits", "--type")
    _bad(invoke("quantize", "--model", path, "--method", "gptq", "--type", "Q4_K_M", "--out", tmp_path / "y"),
         "--type", "kquant")
    one = tmp_path / "one.dat"  # a llama.cpp .dat with only one of the 14 linears
    raw = b"blk.0.attn_q.weight"
    one.write_bytes(struct.pack("<i", 1) + struct.pack("<i", len(raw)) + raw + struct.pack("<ii", 1, 256)
                    + np.ones(256, "<f4").tobytes() + struct.pack("<ii", 1, 0))
    _bad(invoke(*base, "--imatrix", one), "no entry for", "recompute")
    wrong = tmp_path / "wrong.dat"  # every entry present, attn_q's with 128 values instead of 256
    names = [f"blk.{i}.{n}.weight" for i in range(2) for n in
             ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    blob = struct.pack("<i", len(names))
    for n in names:
        size = 288 if "ffn_down" in n else 128 if n == "blk.0.attn_q.weight" else 256
        blob += struct.pack("<i", len(n)) + n.encode() + struct.pack("<ii", 1, size) + np.ones(size, "<f4").tobytes()
    wrong.write_bytes(blob + struct.pack("<ii", 1, 0))
    _bad(invoke(*base, "--imatrix", wrong), "holds 128 values", "blk.0.attn_q.weight")
    (tmp_path / "x.gguf").write_bytes(b"exists")
    _bad(invoke(*base, "--no-imatrix"), "already exists", "--force")


def test_mistral_is_written_as_llama(tmp_path):
    path = make_tiny_model(tmp_path / "mistral", family="mistral", hidden_size=256, intermediate_size=256)
    out = tmp_path / "m.gguf"
    obj = _json(invoke("quantize", "--model", path, "--method", "kquant", "--type", "Q6_K", "--no-imatrix",
                       "--out", out, "--json"))
    r = gguf.GGUFReader(out)
    assert r.fields["general.architecture"].contents() == "llama" and obj["fallbacks"] == []
    assert {t.tensor_type.name for t in r.tensors} == {"Q6_K", "F32"}
