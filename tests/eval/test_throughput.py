"""peak_rss_bytes measures this process, not a parent it was started from."""

from __future__ import annotations

import subprocess
import sys

import pytest

from infq.eval.throughput import peak_rss_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_child_does_not_inherit_parent_peak():
    big = bytearray(400 * 2**20)  # the parent touches 400 MiB
    big[:: 4096] = b"x" * len(big[:: 4096])
    assert peak_rss_bytes() > 400 * 2**20
    code = "from infq.eval.throughput import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 5 * 2**20 < child < 300 * 2**20  # a bare interpreter plus infq's imports, not the parent's 400 MiB
    del big
