"""Shared fixtures (see tinymodels.py).

On a machine without CUDA, TRITON_INTERPRET=1 is set here, before any test module is imported:
Triton reads it when `triton.language` is first imported (its math functions are built then), not
only when a kernel is decorated, so a kernel test that imported a module compiled and reloaded it
later could still not run `tl.math` under the interpreter. Nothing on a CPU launches a compiled
kernel, so the variable is set for the whole run (tests/kernels/conftest.py reloads what was
imported compiled anyway)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from tinymodels import build_tokenizer, make_tiny_model


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    return make_tiny_model(tmp_path / "tiny-llama")


@pytest.fixture
def tiny_tokenizer():
    return build_tokenizer()
