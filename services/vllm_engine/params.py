"""What of an ``arserve.v1`` request maps onto vLLM, and what does not.

Maps one to one: max_tokens, temperature (0 is greedy in both), top_p,
presence_penalty, frequency_penalty, logit_bias (not beside vLLM's speculation), min_tokens, logprobs,
ignore_eos,
top_k (0 is off in both), seed. Stop strings stay with the gateway, as for
arserve's engine, so they behave the same on both; the model's
end-of-sequence ids become vLLM's ``stop_token_ids``. Token ids go in and
come out (vLLM neither tokenizes nor detokenizes).

Does not map, and is INVALID_ARGUMENT: a speculative method other than the
engine's (vLLM fixes it per engine), a draft length other than the
engine's, trees (``num_candidates`` > 1; vLLM verifies chains), and an
adaptive draft length (vLLM's is fixed). This module imports no vLLM: the
gateway checks requests with it.
"""

from __future__ import annotations

from arserve_client.v1 import generation_pb2 as gpb

from ..core.sampling import SEED_MASK, Sampling
from ..errors import InvalidArgument
from ..settings import ModelSettings


def check_request(req: gpb.GenerateRequest, model: ModelSettings) -> None:
    """INVALID_ARGUMENT for what a vLLM-decoded model cannot honour."""
    method = model.vllm.speculative
    spec = req.speculative
    if spec.method and spec.method != method:
        raise InvalidArgument(
            f"speculative.method {spec.method!r} is not available for model {model.id!r}: it is decoded by vLLM, "
            f"whose engine runs {method!r} for every request (vLLM fixes speculation per engine, not per request)")
    if method == "none":
        return  # draft parameters do not apply, as with arserve's method none
    if req.sampling.logit_bias:  # vLLM's SamplingParams refuses it beside a speculative config
        raise InvalidArgument(f"sampling.logit_bias cannot be honoured by model {model.id!r}: its vLLM engine "
                              f"speculates ({method!r}), and vLLM serves no logit bias with speculative decoding")
    k = model.vllm.num_speculative_tokens
    if spec.HasField("num_draft_tokens") and spec.num_draft_tokens != k:
        raise InvalidArgument(f"speculative.num_draft_tokens {spec.num_draft_tokens} cannot be honoured by model "
                              f"{model.id!r}: its vLLM engine drafts {k} tokens per step for every request")
    if spec.HasField("num_candidates") and spec.num_candidates != 1:
        raise InvalidArgument(f"speculative.num_candidates {spec.num_candidates} cannot be honoured by model "
                              f"{model.id!r}: vLLM verifies one draft chain per step, not a tree")
    if spec.HasField("adaptive") and spec.adaptive:
        raise InvalidArgument(f"speculative.adaptive cannot be honoured by model {model.id!r}: vLLM's draft length "
                              f"is fixed ({k} tokens); leave it unset or false")


def sampling_kwargs(sampling: gpb.SamplingParams, eos_ids: tuple[int, ...]) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` for a request whose
    ``max_tokens`` and ``temperature`` the gateway has resolved."""
    out = dict(max_tokens=sampling.max_tokens, temperature=sampling.temperature,
               top_p=Sampling.from_params(sampling).top_p, top_k=sampling.top_k,
               stop_token_ids=list(eos_ids), detokenize=False)
    if sampling.HasField("seed"):
        out["seed"] = sampling.seed & SEED_MASK
    for name in ("presence_penalty", "frequency_penalty"):  # OpenAI's, in both
        if sampling.HasField(name):
            out[name] = getattr(sampling, name)
    if sampling.logit_bias:
        out["logit_bias"] = dict(sampling.logit_bias)
    if sampling.min_tokens:
        out["min_tokens"] = sampling.min_tokens
    if sampling.ignore_eos:
        out.update(ignore_eos=True, stop_token_ids=[])
    if sampling.HasField("logprobs"):  # vLLM's default logprobs_mode (raw_logprobs) is arserve's
        out["logprobs"] = sampling.logprobs
    return out


def token_logprobs(token_ids: list[int], positions: list[dict], top: int) -> list[gpb.TokenLogprob]:
    """vLLM's ``CompletionOutput.logprobs`` (per token, {token id: Logprob
    with .logprob and .rank}: the sampled token and the ``top`` ranked
    first) as arserve's, most likely first."""
    out = []
    for token, entries in zip(token_ids, positions):
        entry = gpb.TokenLogprob(token_id=token, logprob=entries[token].logprob)
        ranked = sorted((lp.rank, t, lp.logprob) for t, lp in entries.items()
                        if lp.rank is not None and lp.rank <= top)
        entry.top.extend(gpb.TopLogprob(token_id=t, logprob=v) for _, t, v in ranked)
        out.append(entry)
    return out
