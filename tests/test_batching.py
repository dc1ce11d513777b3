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


def test_a_released_caller_is_not_waited_for_and_a_silent_one_costs_the_grace_once():
    async def main(leave: bool):
        q, runs = _queue(0.005, Cohort(fraction=100.0, max_s=0.3))
        rng = random.Random(1)
        short = asyncio.create_task(_steps(q, "short", 1, rng, leave=leave))  # one step, then gone
        await asyncio.sleep(0)
        t = time.perf_counter()
        await _steps(q, "long", 3, rng, leave=True)
        await short
        return time.perf_counter() - t

    assert asyncio.run(main(leave=True)) < 0.15
    elapsed = asyncio.run(main(leave=False))
    assert 0.3 <= elapsed < 0.6  # waited for "short" once, the full grace, then never again


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
