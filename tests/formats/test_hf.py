"""Model loading: single/sharded safetensors, .bin through weights_only, hub ids, corrupt files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tinymodels import make_tiny_model

from infq.errors import InfqError
from infq.formats import hf
from infq.formats.hf import Checkpoint, resolve_model
from infq.formats.safetensors_io import SafetensorsFile
from infq.runtime.loader import load_model


def _reference_state(path):
    return load_file(str(path / "model.safetensors"))


def test_single_file_is_memory_mapped_and_exact(tiny_model):
    ckpt = Checkpoint(tiny_model)
    ref = _reference_state(tiny_model)
    assert sorted(ckpt.keys()) == sorted(ref)
    for name, t in ref.items():
        got = ckpt.get(name)
        assert torch.equal(got, t)
    # a view of the file, not a copy: the tensor's memory lies outside torch's allocations
    w = ckpt.get("model.layers.0.mlp.up_proj.weight")
    mm = ckpt._files["model.safetensors"]._map
    base = mm.ctypes.data
    assert base <= w.data_ptr() < base + mm.size


def test_sharded_checkpoint(tmp_path):
    import transformers

    src = make_tiny_model(tmp_path / "src")
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="100KB")
    shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    assert (out / "model.safetensors.index.json").is_file()
    ckpt = Checkpoint(out)
    ref = _reference_state(src)
    assert sorted(ckpt.keys()) == sorted(ref)
    assert all(torch.equal(ckpt.get(k), v) for k, v in ref.items())
    ids = torch.randint(3, 320, (1, 16))
    a = load_model(str(src), tokenizer=False).model(ids)
    b = load_model(str(out), tokenizer=False).model(ids)
    assert torch.equal(a, b)


def test_pytorch_bin_through_weights_only(tmp_path, tiny_model):
    out = tmp_path / "bin"
    out.mkdir()
    shutil.copy(tiny_model / "config.json", out / "config.json")
    state = _reference_state(tiny_model)
    torch.save(state, out / "pytorch_model.bin")
    ckpt = Checkpoint(out)
    assert all(torch.equal(ckpt.get(k), v) for k, v in state.items())


class _Evil:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickle_code_is_refused(tmp_path, tiny_model, capsys):
    out = tmp_path / "evil"
    out.mkdir()
    shutil.copy(tiny_model / "config.json", out / "config.json")
    torch.save({"x": _Evil()}, out / "pytorch_model.bin")
    with pytest.raises(InfqError, match="weights_only|cannot be read safely"):
        Checkpoint(out)
    assert "pickle code ran" not in capsys.readouterr().out


def _corrupt(path, data: bytes):
    path.write_bytes(data)
    with pytest.raises(InfqError) as e:
        SafetensorsFile(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_truncated_and_corrupt_safetensors(tmp_path, tiny_model):
    good = (tiny_model / "model.safetensors").read_bytes()
    assert "truncated" in _corrupt(tmp_path / "a.safetensors", good[:5])
    assert "truncated" in _corrupt(tmp_path / "b.safetensors", good[: len(good) // 2])
    assert "corrupt" in _corrupt(tmp_path / "c.safetensors", (10**12).to_bytes(8, "little") + good[8:])
    n = int.from_bytes(good[:8], "little")
    assert "corrupt" in _corrupt(tmp_path / "d.safetensors", good[:8] + b"x" * n + good[8 + n :])
    header = json.loads(good[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [999, 999]
    raw = json.dumps(header).encode()
    msg = _corrupt(tmp_path / "e.safetensors", len(raw).to_bytes(8, "little") + raw + good[8 + n :])
    assert name in msg


def test_resolve_errors(tmp_path):
    with pytest.raises(InfqError, match="no such file"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InfqError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    assert resolve_model("demo") == hf.demo_model_path()


def test_hub_id_downloads_through_snapshot(monkeypatch, tiny_model):
    calls = {}

    def fake_snapshot(repo_id, revision=None, allow_patterns=None):
        calls.update(repo_id=repo_id, patterns=allow_patterns)
        return str(tiny_model)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot)
    monkeypatch.setattr("infq.formats.hf.hub_reachable", lambda: True)
    assert resolve_model("some-org/some-model") == tiny_model
    assert calls["repo_id"] == "some-org/some-model"
    assert "*.safetensors" in calls["patterns"] and "*.bin" not in calls["patterns"]


def test_hub_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InfqError, match="cannot be fetched"):
        resolve_model("some-org/not-cached-model-xyz")


def test_unsupported_architecture_lists_supported(tmp_path, tiny_model):
    out = tmp_path / "gpt2ish"
    shutil.copytree(tiny_model, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InfqError, match="'gpt2' is not supported; supported: llama, mistral, qwen2"):
        load_model(str(out))


def test_shape_mismatch_with_config(tmp_path, tiny_model):
    out = tmp_path / "bad"
    shutil.copytree(tiny_model, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InfqError, match="does not match its config"):
        load_model(str(out))


def test_read_without_mmap_equals_mmap(tiny_model):
    a, b = Checkpoint(tiny_model), Checkpoint(tiny_model, mmap=False)
    for name in a.keys():
        assert torch.equal(a.get(name), b.get(name))
    w = b.get("model.layers.0.mlp.up_proj.weight")
    w += 1  # fresh memory: writable, and the file is untouched
    assert not torch.equal(w, a.get("model.layers.0.mlp.up_proj.weight"))


@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_load_tokenizer_matches_autotokenizer(tiny_model, which):
    from transformers import AutoTokenizer

    from infq.formats.hf import load_tokenizer

    path = tiny_model if which == "tiny" else hf.demo_model_path()
    text = "def f(x):\n    return {'a': x}  # ünïcödé\n\n\tend"
    ours, ref = load_tokenizer(path), AutoTokenizer.from_pretrained(str(path))
    assert ours(text).input_ids == ref(text).input_ids
    assert ours.bos_token_id == ref.bos_token_id and ours.eos_token_id == ref.eos_token_id
