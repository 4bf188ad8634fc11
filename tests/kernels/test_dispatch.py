"""kernels/dispatch.py on CPU: every packed path against the float64 oracle `ref.quant_linear_ref`.

The packed kernels (aten int4pack / int8pack) run in bfloat16; each result may be at most
tolerances.FACTOR times as wrong as PyTorch's own bfloat16 matmul over the dequantized weight (the
same computation in the same precision). Float32 runs the dense path and must equal F.linear over
the reference decoding bit for bit. The repacking into the common affine form is checked exactly.
Checkpoint-level: GPTQ (RTN and act-order GPTQ) and AutoAWQ checkpoints load into QuantLinears whose
logits meet the same bound against the float32 model, and whose float32 logits equal the
DequantLinear reference exactly.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from peer_layouts import autoawq_config, awq_linear, build_checkpoint
from tinymodels import make_tiny_model
from tolerances import assert_within_baseline

from infq.kernels import dispatch
from infq.kernels.ref import quant_linear_ref
from infq.quantizers.kquants import quantize as gguf_quantize
from infq.quantizers.scheme import QuantizedTensor, QuantScheme
from infq.runtime.linear import DenseLinear, DequantLinear, QuantLinear
from infq.runtime.loader import load_model
from infq.runtime.model import DecoderModel

BF16 = torch.bfloat16
FLOOR_ULPS = 0.25  # PyTorch's bfloat16 error is never 0 here; a small floor keeps the bound sharp


def random_qt(n: int, k: int, bits: int, gs: int, sym: bool, act_order: bool = False, seed: int = 0) -> QuantizedTensor:
    """Random codes, zero points and fp16 scales of GPTQ's ranges (act-order: groups scattered)."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if gs == -1 else k // gs
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)  # (N, K)
    scales = (torch.rand(n, groups, generator=g) * 0.02 + 1e-3).half()  # (N, G)
    if sym:
        zeros = torch.full((n, groups), 1 << (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(0, 1 << bits, (n, groups), generator=g, dtype=torch.int32)
    g_idx = (torch.arange(k) // (k // groups)).to(torch.int32)  # (K,)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    return QuantizedTensor(codes, scales, zeros, g_idx, QuantScheme(bits, gs, sym), (n, k))


def gguf_qt(n: int, k: int, qtype: str, seed: int = 0) -> QuantizedTensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))  # (N, K)
    return QuantizedTensor.from_gguf(gguf_quantize(w, qtype), qtype, (n, k))


def check_against_oracle(qt: QuantizedTensor, expect: str, shape: tuple[int, ...] = (3,), bias: bool = True) -> None:
    n, k = qt.shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, k, generator=g).to(BF16)  # (..., K)
    b = (0.1 * torch.randn(n, generator=g)).to(BF16) if bias else None  # (N,)
    kernel = dispatch.prepare(qt, "cpu", BF16)
    assert kernel.name == expect == dispatch.select(qt, "cpu", BF16)
    y = kernel(x, b)  # (..., N)
    assert y.dtype == BF16 and y.shape == (*shape, n)
    baseline = F.linear(x, qt.dequantize().to(BF16), b)  # PyTorch in bfloat16
    # The packed ops round their output to bfloat16 and the bias is added after: a second rounding,
    # at most half an ulp of the output (<= 0.5 eps max|oracle|), that F.linear's fused bias has not.
    floor = FLOOR_ULPS + (0.5 if bias else 0.0)
    assert_within_baseline(y, quant_linear_ref(x, qt, b), baseline, floor_ulps=floor)


@pytest.mark.parametrize("bits,gs,sym", [(4, 128, True), (4, 32, False), (4, 64, True), (3, 64, False),
                                         (2, 32, False), (4, -1, False), (8, 128, True), (8, 32, False),
                                         (5, 64, False)])
def test_group_affine_int4pack(bits: int, gs: int, sym: bool) -> None:
    check_against_oracle(random_qt(96, 256, bits, gs, sym), "int4pack")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_act_order_permutes_inputs(bits: int) -> None:
    qt = random_qt(64, 256, bits, 64, sym=False, act_order=True, seed=bits)
    aff = dispatch.affine_from(qt)
    assert aff is not None and aff.perm is not None
    check_against_oracle(qt, "int4pack", shape=(2, 5))


@pytest.mark.parametrize("n,k,gs", [(65, 256, 32), (127, 160, 32), (129, 96, -1), (1, 64, 64), (17, 512, 256)])
def test_odd_shapes_pad_rows(n: int, k: int, gs: int) -> None:
    check_against_oracle(random_qt(n, k, 4, gs, sym=False, seed=n), "int4pack", shape=(1,))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 33])
def test_batch_sizes(m: int) -> None:
    check_against_oracle(random_qt(48, 128, 4, 32, sym=True), "int4pack", shape=(m,))


@pytest.mark.parametrize("m", [5, 6, 7, 9, 33])
def test_int4pack_row_split_is_bit_identical(m: int) -> None:
    """The kernel runs M = 4q + r rows as two calls (4q, then r): its output equals the op over all
    M rows at once bit for bit, each row's result being the same whichever call computes it."""
    qt = random_qt(64, 256, 4, 64, sym=True, seed=m)
    kernel = dispatch.prepare(qt, "cpu", BF16)
    assert kernel.name == "int4pack" and kernel._plain
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(BF16)
    whole = torch.ops.aten._weight_int4pack_mm_for_cpu(x, kernel.packed, kernel.group, kernel.sz)  # (M, N)
    assert torch.equal(kernel(x), whole)
    assert torch.equal(kernel(x.view(1, m, 256))[0], whole)


def test_int8_per_channel_uses_int8pack() -> None:
    check_against_oracle(random_qt(80, 192, 8, -1, sym=True), "int8pack", shape=(2, 3))
    asym = random_qt(80, 192, 8, -1, sym=False)  # codes - zeros leave int8's range: two nibble planes
    check_against_oracle(asym, "int4pack")


def test_unsupported_groups_fall_back_to_dense() -> None:
    qt = random_qt(32, 80, 4, -1, sym=False)  # K = 80: no kernel group divides it
    check_against_oracle(qt, "dense")
    check_against_oracle(random_qt(32, 96, 4, 16, sym=True), "dense")  # groups of 16


@pytest.mark.parametrize("qtype,expect", [("Q8_0", "int4pack"), ("Q4_0", "int4pack"), ("Q4_1", "int4pack"),
                                          ("Q5_0", "int4pack"), ("Q5_1", "int4pack"), ("Q4_K", "int4pack"),
                                          ("Q5_K", "int4pack"), ("Q6_K", "dense"), ("Q3_K", "dense"),
                                          ("Q2_K", "dense")])
def test_gguf_blocks(qtype: str, expect: str) -> None:
    check_against_oracle(gguf_qt(48, 512, qtype), expect, shape=(2,))


@pytest.mark.parametrize("make", [lambda: random_qt(32, 128, 3, 32, False, act_order=True),
                                  lambda: random_qt(32, 128, 8, -1, False),
                                  lambda: gguf_qt(16, 256, "Q4_K"), lambda: gguf_qt(16, 256, "Q5_0"),
                                  lambda: gguf_qt(16, 256, "Q8_0"), lambda: gguf_qt(16, 256, "Q4_1"),
                                  lambda: gguf_qt(16, 256, "Q5_K")])
def test_affine_form_is_exact(make) -> None:
    qt = make()
    aff = dispatch.affine_from(qt)
    assert aff is not None
    rep = aff.group
    w = aff.codes.float() * aff.scale.repeat_interleave(rep, 1) + aff.offset.repeat_interleave(rep, 1)  # (N, K)
    if aff.perm is not None:
        w = torch.empty_like(w).index_copy_(1, aff.perm, w)
    assert torch.equal(w, qt.dequantize())


@pytest.mark.parametrize("make", [lambda: random_qt(48, 128, 4, 32, False), lambda: gguf_qt(16, 256, "Q4_K")])
def test_float32_is_exact(make) -> None:
    qt = make()
    x = torch.randn(3, qt.shape[1])
    kernel = dispatch.prepare(qt, "cpu", torch.float32)
    assert kernel.name == "dense"
    assert torch.equal(kernel(x), F.linear(x, qt.dequantize()))


def test_quant_linear_module() -> None:
    qt = random_qt(64, 128, 4, 32, sym=False, act_order=True)
    bias = torch.randn(64)
    lin = QuantLinear(qt, bias, BF16, "cpu")
    assert lin.impl == "int4pack" and (lin.in_features, lin.out_features) == (128, 64)
    assert torch.equal(lin.weight, qt.dequantize())
    x = torch.randn(2, 3, 128).to(BF16)
    ref = DequantLinear(qt, bias.to(BF16))(x)  # bfloat16 product over the per-call decoding
    assert_within_baseline(lin(x), quant_linear_ref(x, qt, bias.to(BF16)), ref, floor_ulps=FLOOR_ULPS)
    reread = QuantLinear(qt, None, torch.float32, "cpu", reread=lambda: qt)
    assert reread.qt is None and torch.equal(reread.weight, qt.dequantize())


# ------------------------------------------------------------------ checkpoints through the loader

def _write_gptq(tmp_path, act_order: bool):
    from infq.quantizers.api import QuantizeRequest, quantize_model

    src = make_tiny_model(tmp_path / "src", family="qwen2")
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"calibration line {i} with some words" for i in range(200)))
    out = tmp_path / "q"
    method = "gptq" if act_order else "rtn"
    quantize_model(QuantizeRequest(model=str(src), method=method, bits=4, group_size=32, sym=not act_order,
                                   desc_act=act_order, dataset=str(text), nsamples=4, seqlen=32, out=str(out)))
    return out


def _write_awq(tmp_path):
    src = make_tiny_model(tmp_path / "src", family="llama")
    rng = random.Random(0)
    out = tmp_path / "awq"
    build_checkpoint(src, out, lambda o, i: awq_linear(o, i, 32, rng), autoawq_config(32))
    return out


@pytest.mark.parametrize("kind", ["rtn", "gptq-act-order", "awq"])
def test_checkpoints_load_into_quant_linears(tmp_path, kind: str) -> None:
    path = _write_awq(tmp_path) if kind == "awq" else _write_gptq(tmp_path, act_order=kind != "rtn")
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    exact = load_model(str(path), tokenizer=False).model  # float32: dense, exact decoding
    fast = load_model(str(path), dtype="bfloat16", tokenizer=False).model
    lins = [lin for blk in fast.blocks for lin in blk.linears.values()]
    assert {type(lin) for lin in lins} == {QuantLinear} and {lin.impl for lin in lins} == {"int4pack"}
    # float32 equals the DequantLinear reference bit for bit
    ref32 = exact(ids)
    for blk in exact.blocks:
        for role, lin in blk.linears.items():
            assert lin.impl == "dense"
            blk.linears[role] = DequantLinear(lin._reread(), lin.bias)
    assert torch.equal(exact(ids), ref32)
    # bfloat16: within the bound of PyTorch's bfloat16 matmuls over the dequantized weights
    got = fast(ids)
    for blk in fast.blocks:
        for role, lin in blk.linears.items():
            blk.linears[role] = DenseLinear(lin.weight.to(BF16), lin.bias)
    assert_within_baseline(got, ref32.double(), fast(ids))


def test_serving_on_cpu_picks_bfloat16_for_integer_weights_only(tmp_path) -> None:
    """`infq run`/`bench` (serving=True) with --dtype auto on a CPU: bfloat16 for integer-coded
    weights, whose packed kernels are fast only there; eval (serving=False) and dense models stay
    float32; an explicit --dtype wins."""
    path = _write_gptq(tmp_path, act_order=False)
    assert load_model(str(path), tokenizer=False, serving=True).model.dtype == BF16
    assert load_model(str(path), tokenizer=False).model.dtype == torch.float32
    assert load_model(str(path), dtype="float32", tokenizer=False, serving=True).model.dtype == torch.float32
    dense = make_tiny_model(tmp_path / "dense", family="llama")
    assert load_model(str(dense), tokenizer=False, serving=True).model.dtype == torch.float32


# ------------------------------------------------------------------ CUDA (skipped without a GPU)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("make", [lambda: random_qt(256, 512, 4, 128, True), lambda: random_qt(96, 256, 3, 64, False, True),
                                  lambda: random_qt(128, 256, 8, -1, True), lambda: gguf_qt(128, 512, "Q4_K"),
                                  lambda: random_qt(32, 96, 4, 16, True)])
@pytest.mark.parametrize("m", [1, 7])
def test_cuda_quant_linear(make, m: int) -> None:
    """On a GPU QuantLinear runs the Triton dequant-GEMM where it supports the scheme, else the
    weight dequantized once to fp16; either within the bound of PyTorch's fp16 matmul."""
    qt = make()
    lin = QuantLinear(qt, None, torch.float16, "cuda")
    assert lin.impl in ("triton", "dense")
    x = torch.randn(m, qt.shape[1], generator=torch.Generator().manual_seed(m)).half()  # (M, K)
    y = lin(x.cuda()).cpu()
    baseline = F.linear(x.cuda(), qt.dequantize().half().cuda()).cpu()
    assert_within_baseline(y, quant_linear_ref(x, qt), baseline)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (1, 1), (), (4,)])
def test_dense_linear_one_row_path(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """`dispatch.linear` (ATen's GEMV for one half-precision row on CPU, F.linear otherwise): within
    the bound of PyTorch's own F.linear against float64, and oneDNN left enabled, errors included."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 257, generator=g).to(dtype)  # odd sizes: no vector width divides them
    b = torch.randn(300, generator=g).to(dtype)
    x = torch.randn(*shape, 257, generator=g).to(dtype)
    y = dispatch.linear(x, w, b)
    oracle = F.linear(x.double(), w.double(), b.double())
    assert y.dtype == dtype and y.shape == (*shape, 300)
    assert_within_baseline(y, oracle, F.linear(x, w, b), floor_ulps=FLOOR_ULPS)
    assert torch.backends.mkldnn.is_available() is False or torch._C._get_mkldnn_enabled()
    with pytest.raises(RuntimeError):
        dispatch.linear(x[..., :5], w)  # a shape error inside the one-row path
    assert torch.backends.mkldnn.is_available() is False or torch._C._get_mkldnn_enabled()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("shape", [(1,), (1, 1), (5,), (2, 3), (129,)])
def test_onednn_packed_linear(shape: tuple[int, ...]) -> None:
    """A weight reordered once by `onednn_pack` gives F.linear within the bound of PyTorch's own
    F.linear against float64, for one row, a few rows and a prefill's worth, with and without
    bias; float16 weights are not packed (float32: `test_onednn_packed_linear_fp32`)."""
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(5)
    w = torch.randn(300, 257, generator=g).to(dtype)  # odd sizes: no vector width divides them
    b = torch.randn(300, generator=g).to(dtype)
    x = torch.randn(*shape, 257, generator=g).to(dtype)
    packed = dispatch.onednn_pack(w)
    if packed is None:
        pytest.skip("this CPU's oneDNN has no bfloat16 linear")
    for bias in (None, b):
        y = dispatch.packed_linear(x, packed, bias)
        oracle = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        assert y.dtype == dtype and y.shape == (*shape, 300)
        assert_within_baseline(y, oracle, F.linear(x, w, bias), floor_ulps=FLOOR_ULPS)
    xt = torch.randn(257, 4, generator=g).to(dtype).t()  # a non-contiguous input
    assert_within_baseline(dispatch.packed_linear(xt, packed), F.linear(xt.double(), w.double()), F.linear(xt, w),
                           floor_ulps=FLOOR_ULPS)
    assert dispatch.onednn_pack(w.half()) is None


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 70])
def test_onednn_packed_linear_fp32(rows: int) -> None:
    """A float32 weight packed by `onednn_pack` gives F.linear within the a-priori error bound of
    any float32 dot product, |y - y64| <= gamma_(K+1) * (|x| @ |w|^T + |b|) per element with
    gamma_n = n u / (1 - n u), u = 2^-24 (Higham, Accuracy and Stability, 3.1), against float64;
    a kernel that rounded through bfloat16 or tf32 anywhere would break it by orders of magnitude.
    Its mean error stays within 8x MKL's (measured 2-4x: it sums in another order)."""
    g = torch.Generator().manual_seed(6)
    k = 1031  # odd: no vector width divides it
    w = torch.randn(300, k, generator=g)
    b = torch.randn(300, generator=g)
    x = torch.randn(rows, k, generator=g)
    packed = dispatch.onednn_pack(w)
    if packed is None:
        pytest.skip("this CPU's oneDNN has no float32 linear")
    u = 2.0 ** -24
    gamma = (k + 1) * u / (1 - (k + 1) * u)
    for bias in (None, b):
        y = dispatch.packed_linear(x, packed, bias)
        oracle = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        bound = gamma * F.linear(x.double().abs(), w.double().abs(), None if bias is None else bias.double().abs())
        assert y.dtype == torch.float32 and y.shape == (rows, 300)
        err = (y.double() - oracle).abs()
        assert (err <= bound).all(), f"max error / bound {(err / bound).max():.3g}"
        mkl = (F.linear(x, w, bias).double() - oracle).abs().mean()
        assert err.mean() <= 8 * mkl, f"mean error {err.mean():.3g} vs MKL's {mkl:.3g}"


def test_small_fp32_weights_use_their_plain_copy_for_few_rows() -> None:
    """A float32 weight under PLAIN_KEEP_BELOW elements keeps its plain copy when packed: up to
    PLAIN_MAX_ROWS rows go through F.linear on it (bit-equal), more rows through oneDNN's packed
    weight (bit-equal to packed_linear); a large one drops the plain copy; bfloat16 always does."""
    g = torch.Generator().manual_seed(7)
    small = DenseLinear(torch.randn(96, 64, generator=g))
    big = DenseLinear(torch.randn(dispatch.PLAIN_KEEP_BELOW // 256 + 1, 256, generator=g))
    half = DenseLinear(torch.randn(96, 64, generator=g).bfloat16())
    w = small.weight.detach().clone()
    if not small.pack():
        pytest.skip("this CPU's oneDNN has no float32 linear")
    assert big.pack() and "weight" not in big._parameters and "weight" in small._parameters
    assert not half.pack() or "weight" not in half._parameters
    for rows in (1, dispatch.PLAIN_MAX_ROWS, dispatch.PLAIN_MAX_ROWS + 1, 32):
        x = torch.randn(rows, 64, generator=g)
        want = F.linear(x, w) if rows <= dispatch.PLAIN_MAX_ROWS else dispatch.packed_linear(x, small.packed)
        assert torch.equal(small(x), want), rows
    kernel = dispatch.DenseKernel.__new__(dispatch.DenseKernel)  # the dequantized-dense kernel, same rule
    kernel.name, kernel.weight, kernel.packed = "dense", w.clone(), None
    assert kernel.pack() and kernel.weight is not None
    x, x9 = torch.randn(3, 64, generator=g), torch.randn(9, 64, generator=g)
    assert torch.equal(kernel(x), F.linear(x, w)) and torch.equal(kernel(x9), dispatch.packed_linear(x9, kernel.packed))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_serving_packs_dense_weights(tmp_path, dtype: str) -> None:
    """serving=True on a CPU in bfloat16 or float32: every dense linear and the untied lm_head hold
    oneDNN's packed weight (and no plain copy, except float32 weights under
    `dispatch.PLAIN_KEEP_BELOW` elements, which keep theirs for few rows), and the logits equal
    those of the unpacked model
    within the bound of the unpacked model (oracle: for bfloat16 the float32 model, whose error is
    orders of magnitude below bfloat16's; for float32 the same model built in float64); eval
    loading (serving=False) keeps plain weights."""
    path = make_tiny_model(tmp_path / "tiny", tie_word_embeddings=False)
    plain = load_model(str(path), dtype=dtype, tokenizer=False).model
    served = load_model(str(path), dtype=dtype, tokenizer=False, serving=True).model
    probe = dispatch.onednn_pack(torch.zeros(16, 16, dtype=getattr(torch, dtype)))
    if probe is None:
        pytest.skip(f"this CPU's oneDNN has no {dtype} linear")
    mods = [m for b in served.blocks for m in [*b.linears.values(), *b.fused.values()]] + [served.lm_head]
    def keeps(m):  # the tiny model's weights are all small: float32 keeps their plain copies
        return dtype == "float32" and m.shape[0] * m.shape[1] < dispatch.PLAIN_KEEP_BELOW

    assert mods and all(isinstance(m, DenseLinear) and m.packed is not None and ("weight" in m._parameters) == keeps(m)
                        for m in mods)
    assert all(m.packed is None for b in plain.blocks for m in b.linears.values())
    ids = torch.randint(0, served.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        if dtype == "float32":
            oracle = DecoderModel(plain.cfg, plain.source, dtype=torch.float64, device=torch.device("cpu"))(ids)
            assert_within_baseline(served(ids), oracle, plain(ids))
        else:
            oracle = load_model(str(path), dtype="float32", tokenizer=False).model(ids)
            assert_within_baseline(served(ids), oracle, plain(ids), floor_ulps=FLOOR_ULPS)
