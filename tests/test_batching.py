"""Continuous batching keeps concurrent requests in step: a run waits for the
callers of the last run to come back (``batching.Cohort``), so N requests
decoding together share one forward per step, not two half-size ones; a
caller that is released is not waited for, and one that never returns costs
the others at most the grace time once. The queue with a stand-in run (the
logic), then the text backbone with a real tiny model and the verifier's
decode loop (the feature)."""

from __future__ import annotations

import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor

from arserve_client.v1 import generation_pb2 as gpb
from arserve.backbone.service import BackboneService
from arserve.batching import Cohort, JoinQueue
from arserve.pb.v1 import verifier_pb2 as vpb
from arserve.verifier.service import VerifierService
from conftest import PROMPT, tiny_target


def _queue(run_s: float, cohort: Cohort) -> tuple[JoinQueue, list[list[str]]]:
    runs: list[list[str]] = []

    def run(items):
        time.sleep(run_s)
        runs.append(list(items))
        return items

    q = JoinQueue(run, ThreadPoolExecutor(1), "test")
    q.cohort = cohort
    return q, runs


async def _steps(q: JoinQueue, caller: str, steps: int, rng: random.Random, leave: bool) -> None:
    for _ in range(steps):
        await q.submit("k", caller, caller)
        await asyncio.sleep(rng.uniform(0, 0.004))  # the verifier's round trip, different for each request
    if leave:
        q.left(caller)


def test_concurrent_callers_share_one_run_per_step():
    async def main(cohort):
        q, runs = _queue(0.01, cohort)
        rng = random.Random(0)
        await asyncio.gather(*(_steps(q, f"r{i}", 10, rng, leave=True) for i in range(4)))
        return runs

    runs = asyncio.run(main(Cohort(fraction=100.0, max_s=1.0)))
    assert [len(r) for r in runs] == [4] * 10  # every step one run of all four
    # without waiting for the cohort, the same callers split into smaller runs
    assert len(asyncio.run(main(Cohort(fraction=0.0)))) > 10


def test_a_run_takes_the_first_calls_key_in_arrival_order_up_to_the_budget():
    """Calls queued while a run goes: the next run takes the first call's
    key, in arrival order, up to the first call that would overrun the size
    budget; that call and the later ones of its key wait for a later run
    (first come, first served, as the text backbone's token budget needs),
    and calls of other keys wait their turn."""
    import threading

    async def main():
        runs, going = [], threading.Event()

        def run(items):
            going.wait(5)
            runs.append(list(items))
            return items

        q = JoinQueue(run, ThreadPoolExecutor(1), "test", size=len, budget=6)
        calls = [asyncio.create_task(q.submit("a", "x"))]
        await asyncio.sleep(0.05)  # "x" runs alone, held until the others are queued
        calls += [asyncio.create_task(q.submit(k, item)) for k, item in
                  (("a", "aa"), ("a", "bbb"), ("b", "c"), ("a", "dddd"), ("a", "e"))]
        await asyncio.sleep(0.05)
        going.set()
        assert await asyncio.gather(*calls) == ["x", "aa", "bbb", "c", "dddd", "e"]  # each caller its own result
        return runs

    assert asyncio.run(main()) == [["x"], ["aa", "bbb"], ["c"], ["dddd", "e"]]


def test_prompts_join_a_run_up_to_the_prefill_budget_and_decode_steps_join_past_them():
    """Prefill rows (here: the upper-case letters of an item) join a run while
    they sum to at most the prefill budget, and always one prompt at least;
    a prompt past it waits, and so do the prompts after it (first come,
    first served), while calls without prefill behind them still join."""
    import threading

    async def main(prefill_budget, size_budget=100):
        runs, going = [], threading.Event()

        def run(items):
            going.wait(5)
            runs.append(list(items))
            return items

        q = JoinQueue(run, ThreadPoolExecutor(1), "test", size=len, budget=size_budget,
                      prefill=lambda item: sum(c.isupper() for c in item), prefill_budget=prefill_budget)
        calls = [asyncio.create_task(q.submit("a", "x"))]
        await asyncio.sleep(0.05)  # "x" runs alone, held until the others are queued
        calls += [asyncio.create_task(q.submit("a", item)) for item in ("d1", "PPPPPp", "d2", "QQQq", "RRr", "d3")]
        await asyncio.sleep(0.05)
        going.set()
        assert await asyncio.gather(*calls) == ["x", "d1", "PPPPPp", "d2", "QQQq", "RRr", "d3"]
        return runs

    # a prompt over the budget alone still runs (with the decode steps); the next two share one run
    assert asyncio.run(main(4)) == [["x"], ["d1", "PPPPPp", "d2", "d3"], ["QQQq"], ["RRr"]]
    assert asyncio.run(main(5)) == [["x"], ["d1", "PPPPPp", "d2", "d3"], ["QQQq", "RRr"]]
    assert asyncio.run(main(None)) == [["x"], ["d1", "PPPPPp", "d2", "QQQq", "RRr", "d3"]]
    # a prompt that waits for the prefill budget does not count against the size budget either: the decode
    # step behind it still joins ("d1" + "PPPPPp" + "d2" + "QQQq" would overrun 13)
    assert asyncio.run(main(4, size_budget=13)) == [["x"], ["d1", "PPPPPp", "d2", "d3"], ["QQQq"], ["RRr"]]


def test_a_released_caller_is_not_waited_for_and_a_silent_one_costs_the_grace_once():
    async def main(leave: bool):
        q, runs = _queue(0.005, Cohort(fraction=1000.0, max_s=1.5))  # a grace far above a loaded host's stalls
        rng = random.Random(1)
        short = asyncio.create_task(_steps(q, "short", 1, rng, leave=leave))  # one step, then gone
        await asyncio.sleep(0)
        t = time.perf_counter()
        await _steps(q, "long", 3, rng, leave=True)
        await short
        return time.perf_counter() - t

    assert asyncio.run(main(leave=True)) < 1.0  # never waited a grace
    elapsed = asyncio.run(main(leave=False))
    assert 1.5 <= elapsed < 2.8  # waited for "short" once, the full grace, then never again (twice: >= 3)


def test_the_backbone_runs_one_forward_per_step_for_concurrent_decodes():
    """Four greedy requests through the verifier's decode loop and the
    backbone's batcher, each reply reaching its verifier after its own delay
    (a round trip over gRPC, the verifier's work): after the prompts, each
    forward holds every request, and each request's tokens are its tokens
    alone."""
    target = tiny_target()

    def request(i: int) -> vpb.VerifyRequest:
        return vpb.VerifyRequest(request_id=f"r{i}", model="tiny", prompt_token_ids=PROMPT[i:],
                                 sampling=gpb.SamplingParams(max_tokens=20),
                                 speculative=gpb.SpeculativeParams(method="none"))

    async def collect(v, r):
        return [t async for ev in v.Run(r) for t in ev.token_ids]

    backbone = BackboneService({"tiny": target})
    batcher = backbone.batchers["tiny"]
    batcher.cohort = Cohort(fraction=100.0, max_s=1.0)  # the tiny model's forwards are too quick to time
    score, rng = backbone.Score, random.Random(2)

    async def delayed(req, context=None):
        out = await score(req, context)
        await asyncio.sleep(rng.uniform(0, 0.004))
        return out
    backbone.Score = delayed
    verifier = VerifierService(backbone, None, {"tiny": (300,)})

    async def together():
        return await asyncio.gather(*(collect(verifier, request(i)) for i in range(4)))

    outputs = asyncio.run(together())
    assert all(len(o) == 20 for o in outputs)
    # 4 prompts (one or two forwards, as they arrive) and 19 decode steps of all 4 requests
    assert batcher.runs <= 2 + 19, batcher.runs
    for i, tokens in enumerate(outputs):
        alone = asyncio.run(collect(VerifierService(BackboneService({"tiny": target}), None, {"tiny": (300,)}),
                                    request(i)))
        assert tokens == alone


def test_prompts_that_arrive_together_are_scored_a_budget_at_a_time_with_their_own_tokens():
    """Six requests at once against a backbone taking 12 prompt rows a
    forward: no forward scores more than 12 prefill rows unless it holds a
    single prompt, the prompts take several forwards while the decode steps
    of those already started ride along, and every request's tokens are
    its tokens alone. A CPU backbone's default is CPU_PREFILL_BATCH."""
    from arserve.backbone.service import CPU_PREFILL_BATCH

    target = tiny_target()

    def request(i: int) -> vpb.VerifyRequest:
        return vpb.VerifyRequest(request_id=f"r{i}", model="tiny", prompt_token_ids=PROMPT[i:i + 7],
                                 sampling=gpb.SamplingParams(max_tokens=6),
                                 speculative=gpb.SpeculativeParams(method="none"))

    async def collect(v, r):
        return [t async for ev in v.Run(r) for t in ev.token_ids]

    assert BackboneService({"tiny": target}).batchers["tiny"].prefill_budget == CPU_PREFILL_BATCH
    backbone = BackboneService({"tiny": target}, prefill_batch_tokens=12)
    forwards, forward_batch = [], target.forward_batch

    def recorded(items):
        forwards.append([item.logits_from for item in items])
        return forward_batch(items)
    target.forward_batch = recorded
    verifier = VerifierService(backbone, None, {"tiny": (300,)})

    async def together():
        return await asyncio.gather(*(collect(verifier, request(i)) for i in range(6)))

    outputs = asyncio.run(together())
    target.forward_batch = forward_batch
    prompts = [[p for p in f if p] for f in forwards]
    assert sum(len(p) for p in prompts) == 6
    assert all(sum(p) <= 12 or len(p) == 1 for p in prompts), prompts
    assert sum(1 for p in prompts if p) >= 3  # 6 prompts of 6 prefill rows: two a forward at most
    assert any(p and len(f) > len(p) for p, f in zip(prompts, forwards))  # a decode step beside a prompt
    for i, tokens in enumerate(outputs):
        alone = asyncio.run(collect(VerifierService(BackboneService({"tiny": target}), None, {"tiny": (300,)}),
                                    request(i)))
        assert tokens == alone
