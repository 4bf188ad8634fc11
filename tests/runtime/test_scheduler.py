"""The scheduler driven by a fake model: the next token is a fixed function of the tokens so far,
so a request's outputs must come out the same whatever batching, chunking or preemption it saw."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from infq.runtime.kv_cache import BlockPool
from infq.runtime.scheduler import Request, Scheduler


def fake_next(tokens: list[int]) -> int:
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) * 31 + len(tokens)) % 97 + 3


def reference(prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    for _ in range(n):
        toks.append(fake_next(toks))
    return toks[len(prompt):]


def drive(sched: Scheduler, max_steps: int = 10_000, check=None):
    """Run to completion; returns ({id: request}, [each step's {id: n}])."""
    done, steps = {}, []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        steps.append(dict(out.num_tokens))
        assert out.num_tokens or out.preempted, "a step that does nothing"
        sampled = {}
        for rid, n in out.num_tokens.items():
            req = sched.requests[rid]
            if req.num_computed + n == req.num_tokens:
                sampled[rid] = fake_next(req.token_ids)
        for req in sched.update(out, sampled):
            done[req.request_id] = req
        if check is not None:
            check(sched, out)
    for req in sched.take_rejected():
        done[req.request_id] = req
    assert not sched.has_unfinished()
    return done, steps


def test_admission_chunked_prefill_and_decode():
    sched = Scheduler(BlockPool(64, 4), max_model_len=64, max_num_batched_tokens=8, max_num_seqs=8)
    for i in range(3):
        sched.add(Request(i, [10 + i] * 5, max_tokens=3))
    first = sched.schedule()
    assert first.num_tokens == {0: 5, 1: 3}  # 1's prefill is chunked by the budget; 2 waits
    sched.update(first, {0: fake_next([10] * 5)})
    second = sched.schedule()
    assert second.num_tokens == {0: 1, 1: 2, 2: 5}  # decode, the rest of the chunk, then admission
    done, _ = drive(sched)
    for i in range(3):
        assert done[i].output_ids == reference([10 + i] * 5, 3)


def test_all_complete_and_match_reference():
    sched = Scheduler(BlockPool(64, 4), max_model_len=64, max_num_batched_tokens=6, max_num_seqs=3)
    prompts = {i: [i + 1] * (3 + 2 * i) for i in range(6)}
    for i, p in prompts.items():
        sched.add(Request(i, p, max_tokens=4 + i))
    done, steps = drive(sched)
    for i, p in prompts.items():
        assert done[i].output_ids == reference(p, 4 + i) and done[i].finish_reason == "length"
    assert all(sum(s.values()) <= 6 and len(s) <= 3 for s in steps)
    assert sched.pool.num_free == 64


def test_preemption_recomputes_and_loses_nothing():
    pool = BlockPool(6, 2)  # 12 token slots for 3 requests that each grow to 10 tokens
    sched = Scheduler(pool, max_model_len=32, max_num_batched_tokens=16, max_num_seqs=8)
    prompts = {i: [7 + i, 3, 5] for i in range(3)}
    for i, p in prompts.items():
        sched.add(Request(i, p, max_tokens=7))
    done, steps = drive(sched)
    assert sched.num_preemptions > 0
    assert sum(r.num_preemptions for r in done.values()) == sched.num_preemptions
    for i, p in prompts.items():
        assert done[i].output_ids == reference(p, 7)
    assert pool.num_free == 6


def test_stop_token_and_rejection_leave_others_alone():
    sched = Scheduler(BlockPool(8, 4), max_model_len=20, max_num_batched_tokens=64)
    prompt = [1, 2, 3]
    stop = reference(prompt, 3)[1]
    sched.add(Request("ok", prompt, max_tokens=10, stop_token_ids=frozenset({stop})))
    sched.add(Request("long", [1] * 15, max_tokens=6))  # 21 > context of 20
    sched.add(Request("fits", [1] * 4, max_tokens=16))  # exactly the context: 20 tokens = 5 of 8 blocks
    sched.add(Request("empty", [], max_tokens=2))
    done, _ = drive(sched)
    assert done["ok"].finish_reason == "stop" and done["ok"].output_ids == reference(prompt, 2)
    assert done["long"].finish_reason == "error" and "context" in done["long"].error
    assert done["empty"].finish_reason == "error"
    assert done["fits"].output_ids == reference([1] * 4, 16)
    small = Scheduler(BlockPool(2, 4), max_model_len=64)
    small.add(Request("big", [1] * 9, max_tokens=4))  # 13 tokens = 4 blocks > the pool's 2
    (req,) = small.take_rejected()
    assert "raise --kv-memory" in req.error and not small.has_unfinished()


def test_prefix_cache_maps_shared_prompt_blocks():
    sched = Scheduler(BlockPool(32, 4), max_model_len=64, max_num_batched_tokens=64)
    system = list(range(3, 15))  # 12 tokens = 3 full blocks
    sched.add(Request("a", system + [40], max_tokens=2))
    drive(sched)
    sched.add(Request("b", system + [50, 51], max_tokens=2))
    out = sched.schedule()
    assert out.num_tokens == {"b": 2} and sched.requests["b"].num_cached_tokens == 12
    sched.add(Request("c", system, max_tokens=2))  # fully cached: the last token is still computed
    out = sched.schedule()
    assert out.num_tokens["c"] == 4  # its last block (tokens 8..11) is recomputed into a fresh block


def test_static_batching_waits_for_the_longest():
    sched = Scheduler(BlockPool(64, 4), max_model_len=64, max_num_batched_tokens=64, max_num_seqs=2, static=True)
    sched.add(Request(0, [1, 2], max_tokens=2))
    sched.add(Request(1, [3, 4], max_tokens=6))
    sched.add(Request(2, [5, 6], max_tokens=2))
    done, steps = drive(sched)
    assert all(2 not in s for s in steps[:6])  # request 2 waits until both members are done
    assert 0 in steps[3]  # request 0 finished at step 2 but keeps decoding (padding)
    assert done[0].output_ids == reference([1, 2], 2) and done[1].output_ids == reference([3, 4], 6)
    assert sched.pool.num_free == 64


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(4, 24), bs=st.integers(1, 4), budget=st.integers(1, 20), seqs=st.integers(1, 6),
       reqs=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 8), st.integers(0, 2)), min_size=1, max_size=8),
       static=st.booleans())
def test_random_workloads(num_blocks, bs, budget, seqs, reqs, static):
    pool = BlockPool(num_blocks, bs)
    sched = Scheduler(pool, max_model_len=16, max_num_batched_tokens=budget, max_num_seqs=seqs, static=static)
    prompts = {}
    for i, (plen, mt, tok) in enumerate(reqs):
        prompts[i] = ([tok + 1] * plen, mt)  # repeated tokens: prefix-cache hits across requests
        sched.add(Request(i, prompts[i][0], max_tokens=mt))

    def check(s, out):
        assert out.total_tokens <= budget and len(s.running) <= seqs
        pool.check([r.block_table for r in s.running])
        for r in s.running:
            assert len(r.block_table) * bs >= r.num_computed  # every computed token has a slot

    done, _ = drive(sched, check=check)
    assert set(done) == set(prompts)  # never a lost request
    for i, (p, mt) in prompts.items():
        need = len(p) + mt
        if need > 16 or pool.blocks_needed(need) > num_blocks:
            assert done[i].finish_reason == "error"
        else:
            assert done[i].output_ids == reference(p, mt)
    assert pool.num_free == num_blocks and not any(pool.ref)
