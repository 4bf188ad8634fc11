"""GGML block encoders/decoders against gguf-py (reference §A.5).

Oracles: `gguf.quants.dequantize` decodes our bytes; our decoder must return the same float32 bits
(tolerance: none). For the types gguf-py can encode (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), our encoder
without an imatrix must write the same bytes as `gguf.quants.quantize` (both follow llama.cpp's
`quantize_row_*_ref`). Error: on the same data, the fitted encoder's squared error (decoded by gguf)
is at most the plain round-to-nearest encoder's (`search=False`, same layout) times 1 + 1e-6, and
with an importance matrix the imatrix-weighted error drops below the encoder without one (Q8_0
ignores the imatrix, as llama.cpp does, and must be unchanged).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from infq.errors import InfqError
from infq.quantizers import kquants

TYPES = tuple(kquants.BLOCK_TYPES)
LEGACY = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
N = 512  # two super-blocks per row


def _data(kind: str, rows: int = 6, n: int = N, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g)
    if kind == "random":
        return w
    if kind == "equal":  # every row one value, positive, negative and zero
        return torch.tensor([0.5, -0.5, 0.0, 3.0, -1e-3, 1.0])[:rows, None].expand(rows, n).contiguous()
    if kind == "zeros":
        return torch.zeros(rows, n)
    if kind == "outliers":  # a few entries 1e4 times the rest
        w.view(-1)[torch.randint(0, rows * n, (8,), generator=g)] = torch.tensor([1e4, -1e4] * 4)
        return w
    if kind == "subnormal":
        return w * 1e-40
    if kind == "mixed":  # half the row tiny, half normal: sub-blocks of very different range
        w[:, : n // 2] *= 1e-6
        return w
    raise AssertionError(kind)


def _imatrix(n: int = N, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(2 * torch.randn(n, generator=g))  # spread over decades, like real activations


def _gguf_decode(data: np.ndarray, name: str, n: int) -> np.ndarray:
    return gguf_dequantize(data, GGMLQuantizationType[name]).reshape(-1, n).astype(np.float32)


KINDS = ("random", "equal", "zeros", "outliers", "subnormal", "mixed")


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_imatrix", (False, True))
def test_decoder_is_bit_identical_to_gguf(name: str, kind: str, with_imatrix: bool) -> None:
    w = _data(kind)
    data = kquants.quantize(w, name, _imatrix() if with_imatrix else None)
    t = kquants.BLOCK_TYPES[name]
    assert data.dtype == np.uint8 and data.shape == (w.shape[0], N // t.block * t.nbytes)
    ours = kquants.dequantize(data, name, N).numpy()
    ref = _gguf_decode(data, name, N)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert np.isfinite(ours).all()


@pytest.mark.parametrize("name", LEGACY)
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "subnormal"])
def test_legacy_bytes_equal_gguf_quantize(name: str, kind: str) -> None:
    w = _data(kind)
    ours = kquants.quantize(w, name)
    ref = gguf_quantize(w.numpy(), GGMLQuantizationType[name]).reshape(ours.shape)
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_subnormal_blocks_match_gguf_except_undefined_codes(name: str) -> None:
    """Subnormal blocks: 1/d overflows, so the reference casts inf to an integer (undefined in C and
    numpy). The scale bytes must still match and decode to 0 there; our codes saturate."""
    w = _data("subnormal")
    ours = kquants.quantize(w, name)
    t = kquants.BLOCK_TYPES[name]
    ref = gguf_quantize(w.numpy(), GGMLQuantizationType[name]).reshape(ours.shape)
    head = 4 if name in ("Q4_1", "Q5_1") else 2
    blocks = (-1, t.nbytes)
    assert np.array_equal(ours.reshape(blocks)[:, :head], ref.reshape(blocks)[:, :head])
    assert not _gguf_decode(ours, name, N).any()


def _sq_err(w: torch.Tensor, data: np.ndarray, name: str, weight: np.ndarray | None = None) -> float:
    diff = _gguf_decode(data, name, w.shape[1]).astype(np.float64) - w.double().numpy()
    e = diff * diff
    return float((e * weight).sum() if weight is not None else e.sum())


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("kind", ("random", "outliers", "mixed"))
def test_fit_no_worse_than_round_to_nearest(name: str, kind: str) -> None:
    w = _data(kind, rows=16)
    fitted = _sq_err(w, kquants.quantize(w, name), name)
    baseline = _sq_err(w, kquants.quantize(w, name, search=False), name)
    assert fitted <= baseline * (1 + 1e-6)
    if name.endswith("_K") and kind == "random":  # the searches must actually help on plain data
        assert fitted < baseline * 0.99


@pytest.mark.parametrize("name", TYPES)
def test_imatrix_lowers_weighted_error(name: str) -> None:
    w, qw = _data("random", rows=16), _imatrix()
    weight = qw.double().numpy()[None, :]
    plain = _sq_err(w, kquants.quantize(w, name), name, weight)
    imat = _sq_err(w, kquants.quantize(w, name, qw), name, weight)
    if name == "Q8_0":
        assert imat == plain
    else:
        assert imat < plain * 0.97


def test_all_types_in_the_table_have_their_sizes() -> None:
    sizes = {name: (t.ggml_type, t.block, t.nbytes) for name, t in kquants.BLOCK_TYPES.items()}
    from gguf.constants import GGML_QUANT_SIZES

    for name, (tid, block, nbytes) in sizes.items():
        assert GGMLQuantizationType(tid).name == name
        assert GGML_QUANT_SIZES[GGMLQuantizationType(tid)] == (block, nbytes)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.randn(2, 300), "Q8_0"), "not a multiple"),
        ((torch.randn(2, 512), "Q4_K", torch.ones(100)), "importance matrix"),
        ((torch.full((2, 256), float("nan")), "Q6_K"), "NaN"),
        ((torch.randn(2, 256), "Q7_K"), "not supported"),
        ((torch.randn(256), "Q8_0"), "2-D"),
    ],
)
def test_bad_input_is_one_line_error(args: tuple, match: str) -> None:
    with pytest.raises(InfqError, match=match) as info:
        kquants.quantize(*args)
    assert "\n" not in str(info.value)


def test_dequantize_rejects_wrong_row_bytes() -> None:
    with pytest.raises(InfqError, match="does not hold"):
        kquants.dequantize(np.zeros((2, 100), np.uint8), "Q4_K", 256)
