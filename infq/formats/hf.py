"""Reading full-precision Hugging Face checkpoints: where a model is, its config, its tensors.

`resolve_model` turns what a user typed (a local directory, a hub id, or `demo` for the bundled
model) into a local directory with a config.json. `Checkpoint` opens the weights: a single
`model.safetensors`, shards listed by `model.safetensors.index.json`, or, for old checkpoints,
`pytorch_model.bin` (+ index) through `torch.load(weights_only=True, mmap=True)` so no pickle code
ever runs. Safetensors are memory-mapped, never copied whole: `get(name)` pages in one tensor.
Tokenizers are loaded by transformers' AutoTokenizer from the same directory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from infq.errors import InfqError
from infq.formats.safetensors_io import SafetensorsFile, StoredTensor

DEMO_NAME = "demo"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def demo_model_path() -> Path:
    """The bundled demo model directory (trained by scripts/train_demo_model.py)."""
    return Path(__file__).resolve().parent.parent / "assets" / "demo"


def resolve_model(model: str, revision: str | None = None) -> Path:
    """A local directory (or file) for `model`: a path, `demo`, or a Hugging Face hub id."""
    path = Path(model).expanduser()
    if path.exists():
        if path.is_file():
            return path
        if not (path / "config.json").is_file():
            raise InfqError(
                f"{model} has no config.json; point at a Hugging Face model directory "
                "(config.json + *.safetensors)"
            )
        return path
    if model == DEMO_NAME:
        return demo_model_path()
    if _HUB_ID.match(model) and not model.startswith((".", "/", "~")):
        return _download(model, revision)
    raise InfqError(f"{model}: no such file or directory (nor a hub id of the form org/name)")


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the hub's host answers at all; saves a minute of retries when offline."""
    import os
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    offline = f"model {repo_id!r} cannot be fetched from the hub (offline?); download it elsewhere and pass the local directory"
    if not hub_reachable():
        try:  # a copy already in the local hub cache still works offline
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS, local_files_only=True))
        except Exception:
            raise InfqError(offline) from None
    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated, ...: all end the same way for a user
        reason = type(e).__name__
        raise InfqError(
            f"model {repo_id!r} cannot be fetched from the hub ({reason}; offline?); "
            "download it elsewhere and pass the local directory"
        ) from None
    return Path(local)


def end_token_ids(model_dir: Path, config: dict[str, Any]) -> list[int]:
    """The ids that end generation by config.json and generation_config.json (where chat models list
    their end-of-turn tokens, as transformers' `generate` and vLLM read them); a broken
    generation_config.json is ignored, as transformers ignores it."""
    ids: set[int] = set()
    gen: Any = {}
    try:
        gen = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    for value in (config.get("eos_token_id"), gen.get("eos_token_id") if isinstance(gen, dict) else None):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return sorted(ids)


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json as a dict, with a one-line error when it is missing or not JSON."""
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise InfqError(f"{model_dir} has no config.json; point at a model directory") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InfqError(f"{path} is not valid JSON ({e}); repair or re-download it") from None
    if not isinstance(config, dict):
        raise InfqError(f"{path} is not a JSON object; repair or re-download it")
    return config


class Checkpoint:
    """The tensors of a model directory by HF name, memory-mapped where the format allows.

    With `mmap=False`, `get` reads each tensor into fresh memory instead: a block-by-block walk
    (calibration) then frees each block's weights when it is done, where a memory map would leave
    every page it touched counted in the process's resident set.
    """

    def __init__(self, model_dir: Path, mmap: bool = True) -> None:
        self.dir = model_dir
        self.mmap = mmap
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        self._pt: dict[str, torch.Tensor] = {}
        shards = _weight_files(model_dir)
        for shard in shards:
            if shard.endswith(".safetensors"):
                st = SafetensorsFile(model_dir / shard)
                self._files[shard] = st
                self._where.update((name, shard) for name in st.keys())
            else:
                self._pt.update(_load_torch_bin(model_dir / shard))
        if not self._where and not self._pt:
            raise InfqError(f"{model_dir} holds no tensors; re-download or re-write the model")

    def keys(self) -> list[str]:
        return [*self._where, *self._pt]

    def __contains__(self, name: str) -> bool:
        return name in self._where or name in self._pt

    def get(self, name: str) -> torch.Tensor:
        if name in self._pt:
            return self._pt[name]
        try:
            st = self._files[self._where[name]]
        except KeyError:
            raise InfqError(f"{self.dir}: tensor {name!r} is missing; the checkpoint is incomplete") from None
        return st.get(name) if self.mmap else st.read(name)

    def stored(self, name: str) -> torch.Tensor | StoredTensor:
        """The tensor for copying into another file: where it lies (safetensors, streamed in
        chunks by the writer) or in memory (.bin checkpoints)."""
        if name in self._pt:
            return self._pt[name]
        if name not in self._where:
            raise InfqError(f"{self.dir}: tensor {name!r} is missing; the checkpoint is incomplete")
        return self._files[self._where[name]].stored(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._pt:
            return tuple(self._pt[name].shape)
        return self._files[self._where[name]].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        if name in self._pt:
            return self._pt[name].dtype
        return self._files[self._where[name]].dtype(name)

    def nbytes(self, name: str) -> int:
        if name in self._pt:
            t = self._pt[name]
            return t.numel() * t.element_size()
        return self._files[self._where[name]].nbytes(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.keys():
            yield name, self.get(name)

    def file_bytes(self) -> int:
        """Bytes on disk of the weight files."""
        return sum(p.stat().st_size for p in weight_paths(self.dir))


def _weight_files(model_dir: Path) -> list[str]:
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = model_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InfqError(f"{index} is corrupt (no weight_map); re-download the model") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (model_dir / f).is_file()]
            if missing:
                raise InfqError(f"{model_dir} lacks shard {missing[0]} named by {index_name}; re-download it")
            return files
        if (model_dir / single).is_file():
            return [single]
    loose = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if loose:
        return loose
    raise InfqError(
        f"{model_dir} has no weights (model.safetensors, an index, or pytorch_model.bin); "
        "point at a complete model directory"
    )


def weight_paths(model_dir: Path) -> list[Path]:
    return [model_dir / f for f in _weight_files(model_dir)]


def _load_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise InfqError(
            f"{path} cannot be read safely ({type(e).__name__}); only plain tensor checkpoints "
            "load (weights_only); convert it to safetensors"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InfqError(f"{path} is not a state dict of tensors; convert it to safetensors")
    return state


def load_tokenizer(model_dir: Path) -> Any:
    """The model's transformers tokenizer (no remote code).

    The class named by tokenizer_config.json is used directly when transformers has it, which is
    what AutoTokenizer resolves too, without AutoTokenizer's config probing (that imports the
    modeling stack, ~160 MB of resident memory, which matters when quantizing with one block in
    memory); anything else goes through AutoTokenizer.
    """
    import transformers

    try:
        cls = _named_tokenizer_class(model_dir, transformers)
        tok = (cls or transformers.AutoTokenizer).from_pretrained(str(model_dir))
    except Exception as e:
        raise InfqError(
            f"{model_dir}: no usable tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "copy the tokenizer files of the original model into it"
        ) from None
    # infq tokenizes whole corpora on purpose and windows them itself: no length warnings.
    tok.model_max_length = 1 << 62
    return tok


def _named_tokenizer_class(model_dir: Path, transformers: Any) -> Any:
    cfg_path = model_dir / "tokenizer_config.json"
    if not (model_dir / "tokenizer.json").is_file() or not cfg_path.is_file():
        return None
    try:
        name = json.loads(cfg_path.read_text()).get("tokenizer_class")
    except (json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(name, str) or not name.isidentifier():
        return None
    return getattr(transformers, name, None) or getattr(transformers, f"{name}Fast", None)
