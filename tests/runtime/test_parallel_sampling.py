"""Parallel sampling (`Engine.add_request(n=...)`, `infq run --n`): the prompt is computed once and
n - 1 sequences fork off its KV blocks copy-on-write. Oracle: each sample equals the same prompt
run as its own request with seed + i (seeded sampling does not depend on the batch), and the pool
holds no reference after they finish; also under preemption and with the prompt ending inside a
block (shared partial block: copied) or on a block boundary (nothing to copy)."""

from __future__ import annotations

import json

import pytest
import torch
from clitools import error_line, invoke

from infq.errors import InfqError
from infq.runtime.engine import Engine, EngineConfig, SampleId
from infq.runtime.generate import eos_ids
from infq.runtime.kv_cache import block_bytes
from infq.runtime.loader import load_model
from infq.runtime.sampling import SamplingParams

BS = 8
PARAMS = SamplingParams(temperature=0.9, top_k=40, seed=11)


@pytest.fixture(scope="module")
def demo():
    return load_model("demo")


def engine(demo, **kw) -> Engine:
    return Engine(demo.model, EngineConfig(**{"block_size": BS, "kv_memory": 64 * block_bytes(demo.config, BS, torch.float32),
                                              **kw}), eos_ids=eos_ids(demo), tokenizer=demo.tokenizer)


def separately(demo, prompt: list[int], n: int, max_tokens: int) -> list[list[int]]:
    """Sample i as a request of its own, seeded seed + i."""
    out = []
    for i in range(n):
        p = SamplingParams(PARAMS.temperature, PARAMS.top_k, PARAMS.top_p, PARAMS.seed + i)
        out.append(engine(demo).generate([prompt], p, max_tokens, ignore_eos=True)[0].token_ids)
    return out


def parallel(eng: Engine, prompts: list[list[int]], n: int, max_tokens: int) -> dict:
    for i, p in enumerate(prompts):
        eng.add_request(p, PARAMS, max_tokens, ignore_eos=True, request_id=i, n=n)
    done = {}
    for outs in eng.stream():
        for o in outs:
            if o.finished:
                parent = o.request_id.parent if isinstance(o.request_id, SampleId) else o.request_id
                done[parent, o.sample_index] = o.token_ids
    return done


@pytest.mark.parametrize("length", [13, 16])  # the prompt ends inside a block, or on its boundary
def test_samples_equal_separate_requests(demo, length):
    prompt = demo.tokenizer("def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):").input_ids[:length]
    assert len(prompt) == length
    eng = engine(demo)
    copies = []
    copy_blocks = eng.kv.copy_blocks
    eng.kv.copy_blocks = lambda pairs: (copies.extend(pairs), copy_blocks(pairs))
    done = parallel(eng, [prompt], 4, 20)
    assert [done[0, i] for i in range(4)] == separately(demo, prompt, 4, 20)
    assert len({tuple(done[0, i]) for i in range(4)}) > 1  # the samples differ
    # the shared last block is copied by all but its last writer; a full one is never written
    assert len(copies) == (3 if length % BS else 0)
    assert eng.pool.num_free == eng.pool.num_blocks
    eng.pool.check([])


def test_samples_under_preemption(demo):
    prompts = [demo.tokenizer(t).input_ids for t in ("import os\nimport sys\n\n", "class Stack:\n    def push(self")]
    eng = engine(demo, kv_memory=11 * block_bytes(demo.config, BS, torch.float32))  # 11 blocks for 6 sequences
    done = parallel(eng, prompts, 3, 24)
    assert eng.scheduler.num_preemptions > 0
    for i, p in enumerate(prompts):
        assert [done[i, j] for j in range(3)] == separately(demo, p, 3, 24)
    assert eng.pool.num_free == eng.pool.num_blocks
    eng.pool.check([])


def test_one_token_samples_finish_at_once(demo):
    prompt = demo.tokenizer("x = 1").input_ids
    done = parallel(engine(demo), [prompt], 5, 1)
    assert [done[0, i] for i in range(5)] == separately(demo, prompt, 5, 1)


def test_bad_n(demo):
    with pytest.raises(InfqError, match="at least 1"):
        engine(demo).add_request([1, 2], n=0)
    with pytest.raises(InfqError, match="exceeds --max-num-seqs"):
        engine(demo, max_num_seqs=2).add_request([1, 2], n=3)
    with pytest.raises(InfqError, match="continuous batching"):
        engine(demo, static=True).add_request([1, 2], n=2)


def test_run_n_json(tmp_path):
    out = invoke("run", "demo", "-p", "def add(a, b):", "--n", 3, "--temperature", 0.8, "--seed", 4,
                 "--max-new-tokens", 6, "--ignore-eos", "--json")
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [(r["index"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (0, 2)]
    alone = json.loads(invoke("run", "demo", "-p", "def add(a, b):", "--temperature", 0.8, "--seed", 6,
                              "--max-new-tokens", 6, "--ignore-eos", "--json").stdout.strip())
    assert rows[2]["token_ids"] == alone["token_ids"]  # sample 2 = seed + 2
    assert "--n 0 must be at least 1" in error_line(invoke("run", "demo", "-p", "x", "--n", 0))
    assert "--logprobs needs --json" in error_line(invoke("run", "demo", "-p", "x", "--logprobs", 2))


def test_copy_on_write_without_a_free_block_preempts(demo, monkeypatch):
    """Three blocks for a 13-token prompt (two blocks) and 3 samples: the first writer of the shared
    block takes the last free one, the next finds none and the newest sample is preempted (not an
    out-of-memory crash); every sample still equals its separate run."""
    from infq.runtime.scheduler import Scheduler

    failed = []
    cow = Scheduler._cow_tail

    def counting(self, req, n, out):
        ok = cow(self, req, n, out)
        failed.extend([] if ok else [req.request_id])
        return ok

    monkeypatch.setattr(Scheduler, "_cow_tail", counting)
    prompt = demo.tokenizer("def fibonacci(n):\n    a, b = 0, 1").input_ids[:13]
    eng = engine(demo, kv_memory=3 * block_bytes(demo.config, BS, torch.float32))
    done = parallel(eng, [prompt], 3, 3)
    assert failed and eng.scheduler.num_preemptions > 0
    assert [done[0, i] for i in range(3)] == separately(demo, prompt, 3, 3)
    assert eng.pool.num_free == eng.pool.num_blocks


def test_abort_frees_a_request_and_its_samples_without_disturbing_others(demo):
    """`Engine.abort`: a running request with forked samples, and a waiting one, dropped mid-run;
    the others' outputs are those of a run without them, and no block stays referenced."""
    prompts = [demo.tokenizer(t).input_ids for t in ("import os\n", "def main():\n", "class A:\n")]
    want = engine(demo).generate(prompts[:1], max_tokens=16, ignore_eos=True)[0].token_ids
    eng = engine(demo, max_num_seqs=4)
    eng.add_request(prompts[0], max_tokens=16, ignore_eos=True, request_id="keep")
    eng.add_request(prompts[1], PARAMS, 16, ignore_eos=True, request_id="forked", n=3)
    outs = eng.step()  # both prompts computed, "forked" forks: 4 running
    eng.add_request(prompts[2], max_tokens=16, ignore_eos=True, request_id="waiting")  # no room: waits
    outs += eng.step()
    assert {o.request_id for o in outs} >= {SampleId("forked", 1), SampleId("forked", 2)}
    assert "waiting" in {r.request_id for r in eng.scheduler.waiting}
    assert eng.abort("forked") and eng.abort("waiting") and not eng.abort("nothing")
    done = {o.request_id: o for step in eng.stream() for o in step if o.finished}
    assert list(done) == ["keep"] and done["keep"].token_ids == want
    assert eng.pool.num_free == eng.pool.num_blocks and not eng.tracks
    eng.pool.check([])


def test_interactive_ctrl_c_drops_the_reply(monkeypatch, tmp_path):
    """Ctrl-C during a reply aborts it (its blocks freed) and the conversation goes on without that turn."""
    from clitools import runner

    from infq.cli.app import app
    from infq.runtime import generate

    calls = []
    real = generate.run_prompts

    def interrupted_once(engine, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # a reply under way when Ctrl-C comes
            engine.add_request([1, 2, 3], max_tokens=4, request_id=0)
            engine.step()
            raise KeyboardInterrupt
        assert not engine.tracks and engine.pool.num_free == engine.pool.num_blocks  # the first turn is gone
        return real(engine, *args, **kwargs)

    monkeypatch.setattr(generate, "run_prompts", interrupted_once)
    t = tmp_path / "t.jinja"
    t.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
    r = runner.invoke(app, ["run", "demo", "-i", "--chat-template", str(t), "--max-new-tokens", "3", "--json"],
                      input="first\nsecond\n")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [row["prompt"] for row in rows] == ["second"] and len(calls) == 2
    assert "reply interrupted" in r.output
    # "first" never joined the conversation: the second turn's prompt is "second" alone
    from infq.runtime.chat import ChatEncoder

    alone = ChatEncoder(load_model("demo").tokenizer, t.read_text())([{"role": "user", "content": "second"}])
    assert rows[0]["prompt_tokens"] == len(alone)
