"""QuantizedTensor kind "gguf:<TYPE>": raw GGML block bytes whose dequantize() equals gguf-py's decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infq.errors import InfqError
from infq.quantizers import kquants
from infq.quantizers.scheme import QuantizedTensor, QuantScheme

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1", "Q2_K", "Q4_K", "Q6_K"])
def test_gguf_kind_decodes_like_gguf_py(qtype: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 512)  # (out, in)
    data = kquants.quantize(w, qtype)  # uint8 (6, 512 / block * type_size)
    qt = QuantizedTensor.from_gguf(data, qtype, (6, 512))
    assert qt.scheme == QuantScheme.gguf(qtype) and qt.scheme.ggml_type == qtype
    assert qt.nbytes == data.size and qt.bits_per_weight == pytest.approx(8 * data.size / (6 * 512))
    oracle = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])  # (6, 512) float32
    assert torch.equal(qt.dequantize(), torch.from_numpy(np.ascontiguousarray(oracle)))  # bit for bit
    assert torch.equal(qt.dequantize(torch.float32, slice(2, 4)), qt.dequantize()[2:4])
    assert qt.dequantize(torch.float16).dtype == torch.float16


def test_gguf_scheme_fields() -> None:
    s = QuantScheme.gguf("q4_k")
    assert (s.kind, s.bits, s.group_size, s.sym) == ("gguf:Q4_K", 4, 256, False)
    assert QuantScheme.gguf("Q6_K").sym and QuantScheme.gguf("Q8_0").group_size == 32
    assert QuantScheme(bits=4, group_size=128).ggml_type == ""


def test_gguf_kind_refuses_wrong_data() -> None:
    with pytest.raises(InfqError, match="IQ4_NL"):
        QuantScheme.gguf("IQ4_NL")
    with pytest.raises(InfqError, match="group_size 256"):
        QuantScheme(bits=4, group_size=32, sym=False, kind="gguf:Q4_K")
    with pytest.raises(InfqError, match="wrong"):
        QuantizedTensor.from_gguf(np.zeros((2, 100), np.uint8), "Q4_K", (2, 256))  # Q4_K row = 144 bytes
    with pytest.raises(InfqError, match="uint8"):
        QuantizedTensor.from_gguf(np.zeros((2, 144), np.int8), "Q4_K", (2, 256))
