"""Triton kernel tests: on a machine without CUDA every kernel runs under Triton's interpreter.

TRITON_INTERPRET is read when `@triton.jit` decorates a kernel, so it is set here, before the test
modules of this folder import the kernels, and any infq kernel module that an earlier test folder
already imported compiled is reloaded. The variable stays set for the rest of the process: Triton
reads it again at launch, and on a CPU-only machine no other test launches a compiled kernel. With
CUDA present nothing changes: the interpreter tests skip themselves and the *_gpu.py modules run
the kernels compiled.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in [n for n in sys.modules if n.startswith("infq.kernels.")]:
        _mod = sys.modules[_name]
        if getattr(_mod, "_interpreting", None) is not None and not _mod._interpreting():
            importlib.reload(_mod)
