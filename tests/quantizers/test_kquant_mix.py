"""Mix type selection against our reading of llama.cpp's llama_tensor_get_type (src/llama-quant.cpp).

Each expectation below is written out by hand from that reading (reference §A.5.1), not computed with
the helper under test: e.g. Q4_K_M on a 32-layer model gives attn_v and ffn_down Q6_K in layers
0-3, 6, 9, ..., 27 and 28-31 (use_more_bits), Q4_K elsewhere, output Q6_K, token_embd Q4_K.
"""

from __future__ import annotations

import pytest

from infq.errors import InfqError
from infq.quantizers.kquant_mix import MIXES, ModelShape, file_type, parse_overrides, plan_mix

MORE_BITS_32 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}  # llama.cpp's 16 of 32


def llama_shapes(n_layers: int, hidden: int = 256, ff: int = 768, kv: int = 64, vocab: int = 1000) -> dict:
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden)}
    for i in range(n_layers):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.attn_q.weight": (hidden, hidden),
            f"blk.{i}.attn_k.weight": (kv, hidden), f"blk.{i}.attn_v.weight": (kv, hidden),
            f"blk.{i}.attn_output.weight": (hidden, hidden), f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.ffn_gate.weight": (ff, hidden), f"blk.{i}.ffn_up.weight": (ff, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ff),
        })
    return shapes


SHAPE32 = ModelShape(n_layers=32, n_head=32, n_head_kv=8)


def test_q4_k_m_types_per_layer() -> None:
    plan = plan_mix("Q4_K_M", llama_shapes(32), SHAPE32).types()
    assert plan["output.weight"] == "Q6_K" and plan["token_embd.weight"] == "Q4_K"
    assert plan["output_norm.weight"] == "F32" and plan["blk.5.attn_norm.weight"] == "F32"
    for i in range(32):
        want = "Q6_K" if i in MORE_BITS_32 else "Q4_K"
        assert plan[f"blk.{i}.attn_v.weight"] == want, i
        assert plan[f"blk.{i}.ffn_down.weight"] == want, i
        for other in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert plan[f"blk.{i}.{other}.weight"] == "Q4_K"
    assert file_type("Q4_K_M") == 15


def test_other_mixes() -> None:
    shapes = llama_shapes(32)
    q2 = plan_mix("Q2_K", shapes, SHAPE32).types()  # GQA 32/8 = 4 -> attn_v Q4_K
    assert (q2["blk.0.attn_v.weight"], q2["blk.0.ffn_down.weight"], q2["blk.0.attn_output.weight"],
            q2["blk.0.attn_q.weight"], q2["output.weight"]) == ("Q4_K", "Q3_K", "Q3_K", "Q2_K", "Q6_K")
    q2mha = plan_mix("Q2_K", shapes, ModelShape(32, 32, 32)).types()
    assert q2mha["blk.0.attn_v.weight"] == "Q3_K"
    q3m = plan_mix("Q3_K_M", shapes, SHAPE32).types()  # attn_v Q5_K for layers 0-1; ffn_down Q5_K below 32/16
    assert [q3m[f"blk.{i}.attn_v.weight"] for i in range(4)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
    assert [q3m[f"blk.{i}.ffn_down.weight"] for i in range(4)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
    assert q3m["blk.9.attn_output.weight"] == "Q4_K" and q3m["blk.9.ffn_up.weight"] == "Q3_K"
    q3l = plan_mix("Q3_K_L", shapes, SHAPE32).types()
    assert (q3l["blk.9.attn_v.weight"], q3l["blk.9.ffn_down.weight"], q3l["blk.9.attn_output.weight"]) == ("Q5_K",) * 3
    q4s = plan_mix("Q4_K_S", shapes, SHAPE32).types()  # attn_v Q5_K in layers 0-3, ffn_down below 32/8
    assert [q4s[f"blk.{i}.attn_v.weight"] for i in (3, 4)] == ["Q5_K", "Q4_K"]
    assert [q4s[f"blk.{i}.ffn_down.weight"] for i in (3, 4)] == ["Q5_K", "Q4_K"]
    q5m = plan_mix("Q5_K_M", shapes, SHAPE32).types()
    assert q5m["blk.6.attn_v.weight"] == "Q6_K" and q5m["blk.7.attn_v.weight"] == "Q5_K"
    assert set(plan_mix("Q5_K_S", shapes, SHAPE32).types().values()) == {"Q5_K", "Q6_K", "F32"}
    q8 = plan_mix("Q8_0", shapes, SHAPE32).types()
    assert set(q8.values()) == {"Q8_0", "F32"}
    q40 = plan_mix("Q4_0", shapes, SHAPE32).types()
    assert q40["output.weight"] == "Q6_K" and q40["blk.0.ffn_down.weight"] == "Q4_0"
    q40i = plan_mix("Q4_0", shapes, SHAPE32, has_imatrix=True).types()  # llama.cpp's ffn_down guard
    assert [q40i[f"blk.{i}.ffn_down.weight"] for i in (3, 4)] == ["Q4_1", "Q4_0"]
    assert len(MIXES) == 11


def test_70b_bumps_attn_v_and_tied_output() -> None:
    plan = plan_mix("Q3_K_S", llama_shapes(80, hidden=256, kv=32), ModelShape(80, 64, 8)).types()
    assert plan["blk.10.attn_v.weight"] == "Q5_K" and plan["blk.10.attn_q.weight"] == "Q3_K"
    shapes = llama_shapes(4)
    del shapes["output.weight"]
    tied = plan_mix("Q4_K_M", shapes, ModelShape(4, 4, 2, has_output=False)).types()
    assert tied["token_embd.weight"] == "Q6_K"


def test_fallback_for_rows_not_multiple_of_256() -> None:
    shapes = llama_shapes(4, hidden=288, ff=800, kv=96)  # rows of 288 and 800: 32-divisible, not 256
    plan = plan_mix("Q4_K_M", shapes, ModelShape(4, 4, 2))
    types = plan.types()
    assert types["blk.1.attn_q.weight"] == "Q5_0"  # Q4_K -> Q5_0
    assert types["blk.3.ffn_down.weight"] == "Q8_0"  # Q6_K (use_more_bits(3, 4): 3 >= 7*4//8) -> Q8_0
    assert types["output.weight"] == "Q8_0"  # output: Q8_0 when the row does not fit the default block
    assert {(f["tensor"], f["from"], f["to"]) for f in plan.fallbacks} >= {
        ("blk.1.attn_q.weight", "Q4_K", "Q5_0"), ("blk.3.ffn_down.weight", "Q6_K", "Q8_0")}
    q5 = plan_mix("Q5_K_S", shapes, ModelShape(4, 4, 2)).types()
    assert q5["blk.1.attn_q.weight"] == "Q5_1"
    q3 = plan_mix("Q3_K_S", shapes, ModelShape(4, 4, 2)).types()
    assert q3["blk.1.attn_q.weight"] == "Q4_0"  # llama.cpp: IQ4_NL; infq: Q4_0 (same 4.5 bpw)
    odd = plan_mix("Q8_0", {"blk.0.attn_q.weight": (64, 100)}, ModelShape(1, 1, 1)).types()
    assert odd["blk.0.attn_q.weight"] == "F16"


def test_bits_per_weight_counts_every_tensor() -> None:
    shapes = {"blk.0.attn_q.weight": (256, 256), "blk.0.attn_norm.weight": (256,)}
    plan = plan_mix("Q4_K_S", shapes, ModelShape(1, 1, 1))
    want = 8 * (256 * 144 + 256 * 4) / (256 * 256 + 256)  # Q4_K: 144 bytes per 256; F32 norm
    assert plan.bits_per_weight == pytest.approx(want)


def test_tensor_type_overrides() -> None:
    shapes = llama_shapes(4)
    ov = parse_overrides([r"attn_q=Q8_0", r"blk\.0\..*=q5_k", r"blk\.0\.attn_q=F16"])
    plan = plan_mix("Q4_K_M", shapes, ModelShape(4, 4, 2), overrides=ov)
    types = plan.types()
    assert types["blk.1.attn_q.weight"] == "Q8_0"
    assert types["blk.0.attn_k.weight"] == "Q5_K" and types["blk.0.attn_q.weight"] == "F16"  # last match wins
    assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors are never quantized
    assert {o["tensor"] for o in plan.overrides} >= {"blk.1.attn_q.weight", "blk.0.attn_q.weight"}


@pytest.mark.parametrize("spec, msg", [("attn_q", "REGEX=TYPE"), ("attn_(=Q4_K", "invalid"),
                                       ("attn_q=Q7_K", "not supported"), ("=Q4_K", "REGEX=TYPE")])
def test_bad_overrides(spec: str, msg: str) -> None:
    with pytest.raises(InfqError, match=msg):
        parse_overrides([spec])


def test_bad_mix_and_unfit_override() -> None:
    with pytest.raises(InfqError, match="Q4_K_M"):
        plan_mix("Q4_K_X", llama_shapes(1), ModelShape(1, 4, 2))
    with pytest.raises(InfqError, match="block of 256"):
        plan_mix("Q8_0", {"blk.0.attn_q.weight": (64, 288)}, ModelShape(1, 1, 1),
                 overrides=parse_overrides(["attn_q=Q4_K"]))
