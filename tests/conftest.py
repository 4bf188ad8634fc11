"""Shared fixtures (see tinymodels.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinymodels import build_tokenizer, make_tiny_model


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    return make_tiny_model(tmp_path / "tiny-llama")


@pytest.fixture
def tiny_tokenizer():
    return build_tokenizer()
