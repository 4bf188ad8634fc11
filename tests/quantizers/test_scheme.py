"""QuantConfig validation and serialisation; QuantScheme; QuantizedTensor's reference dequantize
against a plain-Python oracle (exact: (q - z) * fp16 scale is exact in fp32)."""

from __future__ import annotations

import pytest
import torch

from infq.errors import InfqError
from infq.quantizers.scheme import QuantConfig, QuantizedTensor, QuantScheme, check_group_size


def test_defaults_are_valid_and_round_trip() -> None:
    c = QuantConfig()
    assert (c.method, c.bits, c.group_size, c.sym, c.desc_act) == ("gptq", 4, 128, True, False)
    assert (c.damp_percent, c.nsamples, c.seqlen, c.skip, c.lm_head) == (0.01, 128, 2048, (), False)
    c2 = QuantConfig(method="gptq", bits=3, group_size=-1, sym=False, desc_act=True,
                     static_groups=True, damp_percent=0.1, skip=(r".*\.mlp\.down_proj",), lm_head=True)
    assert QuantConfig.from_dict(c2.to_dict()) == c2
    assert isinstance(c2.to_dict()["skip"], list)


@pytest.mark.parametrize(
    ("kwargs", "fix"),
    [
        ({"bits": 5}, "bits 5 is not supported by gptq; use 2, 3, 4 or 8"),
        ({"method": "rtn", "bits": 6}, "use 2, 3, 4 or 8"),
        ({"method": "awq", "bits": 5}, "bits 5 is not supported by awq; use 2, 3, 4 or 8"),
        ({"bits": True}, "use 2, 3, 4 or 8"),
        ({"damp_percent": 0}, "use a value in (0, 1)"),
        ({"damp_percent": 1.5}, "use a value in (0, 1)"),
        ({"damp_percent": 1}, "use a value in (0, 1)"),
        ({"group_size": 0}, "use -1 (per-channel) or a positive integer"),
        ({"group_size": -2}, "use -1 (per-channel) or a positive integer"),
        ({"method": "foo"}, "use one of rtn, gptq, awq, fp8, kquant"),
        ({"method": "rtn", "desc_act": True}, "set desc_act=False for rtn"),
        ({"sym": 1}, "sym must be true or false"),
        ({"nsamples": 0}, "nsamples 0 must be a positive integer"),
        ({"skip": "lm_head"}, "skip must be a tuple"),
        ({"skip": ("(",)}, "is not a valid regex"),
    ],
)
def test_bad_config_names_the_fix(kwargs: dict, fix: str) -> None:
    with pytest.raises(InfqError) as e:
        QuantConfig(**kwargs)
    assert fix in str(e.value)
    assert "\n" not in str(e.value)


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(InfqError, match="unknown quantization config key.*wbits.*valid keys"):
        QuantConfig.from_dict({"wbits": 4})


def test_is_skipped() -> None:
    c = QuantConfig(skip=(r"model\.layers\.0\.",))
    assert c.is_skipped("lm_head")
    assert c.is_skipped("model.layers.0.mlp.down_proj")
    assert not c.is_skipped("model.layers.1.mlp.down_proj")
    assert not QuantConfig(lm_head=True).is_skipped("lm_head")


def test_check_group_size() -> None:
    assert check_group_size(256, 128) == 2
    assert check_group_size(300, -1) == 1
    with pytest.raises(InfqError) as e:
        check_group_size(384, 256)
    msg = str(e.value)
    assert "input dim 384" in msg and "-1 (per-channel)" in msg and "64 or 128" in msg


def test_scheme() -> None:
    assert QuantScheme(bits=3, group_size=128).maxq == 7
    assert QuantScheme.from_config(QuantConfig(bits=8, sym=False)) == QuantScheme(8, 128, False, "int")
    with pytest.raises(InfqError, match="kind"):
        QuantScheme(bits=4, group_size=128, kind="nf4")
    with pytest.raises(InfqError, match="no integer scheme"):
        QuantScheme.from_config(QuantConfig(method="fp8", bits=8, group_size=-1))


def _tiny_qt() -> QuantizedTensor:
    """3 x 4 weight, 2 groups of 2 with an act-order style g_idx, codes hitting 0 and maxq."""
    codes = torch.tensor([[0, 15, 3, 8], [8, 8, 0, 1], [15, 0, 7, 9]], dtype=torch.uint8)
    scales = torch.tensor([[0.5, 0.25], [1.0, 2.0], [0.125, 3.0]], dtype=torch.float16)
    zeros = torch.tensor([[8, 8], [3, 16], [0, 15]], dtype=torch.int32)
    g_idx = torch.tensor([1, 0, 0, 1], dtype=torch.int32)
    return QuantizedTensor(codes, scales, zeros, g_idx, QuantScheme(4, 2, sym=False), (3, 4))


def test_dequantize_matches_python_oracle() -> None:
    qt = _tiny_qt()
    expect = [
        [float(qt.scales[o, int(qt.g_idx[i])]) * (int(qt.codes[o, i]) - int(qt.zeros[o, int(qt.g_idx[i])]))
         for i in range(4)]
        for o in range(3)
    ]
    got = qt.dequantize()
    assert got.dtype == torch.float32
    assert got.tolist() == expect  # exact, and uint8 codes below the zero do not wrap around
    assert qt.dequantize(torch.float16).dtype == torch.float16


def test_storage_accounting() -> None:
    out, inp = 8, 256
    qt = QuantizedTensor(
        codes=torch.zeros(out, inp, dtype=torch.uint8),
        scales=torch.ones(out, 2, dtype=torch.float16),
        zeros=torch.full((out, 2), 8, dtype=torch.int32),
        g_idx=(torch.arange(inp) // 128).to(torch.int32),
        scheme=QuantScheme(4, 128),
        shape=(out, inp),
    )
    assert qt.bits_per_weight == pytest.approx(4 + (16 + 4) / 128, abs=0)
    assert qt.nbytes == (out * inp * 4 + out * 2 * 20) // 8


def test_quantized_tensor_rejects_inconsistent_parts() -> None:
    qt = _tiny_qt()
    with pytest.raises(ValueError, match="uint8"):
        QuantizedTensor(qt.codes.int(), qt.scales, qt.zeros, qt.g_idx, qt.scheme, qt.shape)
    with pytest.raises(ValueError, match="g_idx values"):
        QuantizedTensor(qt.codes, qt.scales, qt.zeros, qt.g_idx + 1, qt.scheme, qt.shape)
    with pytest.raises(ValueError, match="int32 zeros"):
        QuantizedTensor(qt.codes, qt.scales, None, qt.g_idx, qt.scheme, qt.shape)
