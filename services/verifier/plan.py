"""What one Run decodes, read once from its ``VerifyRequest``: the
request's sampling and randomness, its end-of-sequence ids, its speculative
method (``arserve.drafter.registry.METHODS``) and draft length, the ids that
key its state downstream, and what every Score call carries. The decode loop
(``arserve.verifier.service``) reads the plan and never the proto's defaults.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import torch

from arserve_client.v1 import generation_pb2 as gpb

from ..core.logits_processors import LogitsProcessors
from ..core.sampling import RowProbs, Sampling, seeded
from ..drafter.registry import METHODS, MethodSpec
from ..errors import InvalidArgument
from ..pb.v1 import backbone_pb2 as bpb
from ..pb.v1 import drafter_pb2 as dpb
from ..pb.v1 import verifier_pb2 as pb
from ..settings import ServiceSettings
from ..wire import TensorProto, from_proto, proto_row
from .draft_length import ClassedLength, DraftLength
from .logprobs import MAX_LOGPROBS, token_logprobs


def _default(name: str):
    return ServiceSettings.model_fields[name].default


@dataclass(frozen=True)
class SpeculationDefaults:
    """What a request leaves unset, from the settings (their one home: ``ServiceSettings``)."""

    num_draft_tokens: int = _default("num_draft_tokens")  # draft length (the adaptive upper bound)
    adaptive: bool = _default("adaptive_draft_length")  # the draft length follows the acceptance rate
    cost_per_token: float = _default("draft_cost_per_token")  # DraftLength's cost model (docs/decisions.md)
    draft_timeout_s: float = _default("draft_timeout_s")  # a proposal slower than this costs a plain round
    row_cost: float | None = _default("draft_row_cost")  # DraftLength's cost model with requests decoding together

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> "SpeculationDefaults":
        return cls(settings.num_draft_tokens, settings.adaptive_draft_length, settings.draft_cost_per_token,
                   settings.draft_timeout_s, settings.draft_row_cost)


def run_id(request_id: str) -> str:
    """The id a Run keys its state on (the backbone's KV session, the
    drafter's context, a sticky replica): the caller's id, for logs, and a
    random suffix, so that two Runs never share state even when their callers
    send the same id (the gateway sends a fresh one per request; the Run RPC
    trusts no caller for that). vLLM's engine asks the same of request ids."""
    return f"{request_id}-{secrets.token_hex(8)}"


def request_generator(sampling: gpb.SamplingParams) -> torch.Generator:
    """The request's own random generator (seeded, or from os.urandom)."""
    return seeded(sampling.seed if sampling.HasField("seed") else int.from_bytes(os.urandom(8), "little"))


@dataclass(frozen=True)
class RequestPlan:
    """One Run, decided before its first round."""

    request_id: str  # the caller's id (logs only)
    ids: dict  # request_id (run_id: keys this Run's state downstream) and model, on every downstream call
    prompt: tuple[int, ...]  # [L] prompt token ids
    max_tokens: int  # tokens to generate at most (end-of-sequence ends sooner)
    params: gpb.SamplingParams  # the request's sampling fields, as sent (the drafter reads them too)
    sampling: Sampling  # the same, as the acceptance rules read them
    generator: torch.Generator  # the request's randomness: sampling, acceptance and draft seeds
    eos: frozenset[int]  # end-of-sequence token ids of the model (none where the request ignores them)
    method: MethodSpec  # the speculative method and what it needs
    drafting: bool  # the method drafts and a drafter is there (else every round is plain)
    k_max: int  # draft length, the adaptive length's upper bound; 0 when not drafting
    candidates: int  # draft chains per round (> 1: a tree, where the method drafts trees)
    adaptive: bool  # the draft length follows the acceptance rate (DraftLength)
    cost_per_token: float  # DraftLength's cost model
    row_cost: float | None  # the same, with requests decoding together
    max_positions: int  # the most KV positions the request holds (reserved from the backbone's budget)
    cache_salt: str  # the caller's KV namespace ("" = shared)
    logprobs: int | None = None  # most likely tokens reported beside each token's log-probability; None: none
    processors: LogitsProcessors = LogitsProcessors()  # penalties, logit bias, min_tokens on the target's logits

    @classmethod
    def from_proto(cls, req: pb.VerifyRequest, defaults: SpeculationDefaults, eos: tuple[int, ...] = (),
                   drafter: bool = True) -> "RequestPlan":
        """drafter: whether a drafter is there to ask."""
        method = METHODS.get(req.speculative.method or "none")
        if method is None:
            raise InvalidArgument(f"speculative.method {req.speculative.method!r} is unknown; known: {list(METHODS)}")
        spec, s = req.speculative, req.sampling
        drafting = method.drafts and drafter
        k_max = spec.num_draft_tokens if spec.HasField("num_draft_tokens") else defaults.num_draft_tokens
        candidates = spec.num_candidates if spec.HasField("num_candidates") and method.trees else 1
        # the most positions the cache holds: a chain round ends at most at prompt + max_tokens - 1;
        # a tree of c branches has up to (c - 1) * k more nodes than a chain
        tree_nodes = (max(1, candidates) - 1) * k_max if drafting else 0
        ends = frozenset() if s.ignore_eos else frozenset(eos)
        if s.HasField("logprobs") and s.logprobs > MAX_LOGPROBS:
            raise InvalidArgument(f"sampling.logprobs: at most {MAX_LOGPROBS}, got {s.logprobs}")
        return cls(
            request_id=req.request_id, ids=dict(request_id=run_id(req.request_id), model=req.model),
            prompt=tuple(req.prompt_token_ids), max_tokens=s.max_tokens, params=s,
            sampling=Sampling.from_params(s), generator=request_generator(s), eos=ends, method=method,
            drafting=drafting, k_max=k_max if drafting else 0, candidates=candidates,
            adaptive=spec.adaptive if spec.HasField("adaptive") else defaults.adaptive, cost_per_token=defaults.cost_per_token,
            row_cost=defaults.row_cost,
            max_positions=len(req.prompt_token_ids) + s.max_tokens + tree_nodes, cache_salt=req.cache_salt,
            logprobs=s.logprobs if s.HasField("logprobs") else None, processors=LogitsProcessors.from_params(s, ends))

    @property
    def reproducible(self) -> bool:
        """Sampled with a seed: its tokens follow from the request alone (``load``)."""
        return self.params.HasField("seed") and not self.sampling.greedy

    def load(self, decoding: int) -> int:
        """The requests decoding together as this request's draft length reads
        them (``DraftLength``'s batch cost). A sampled request's tokens depend
        on its draft lengths (a draft's acceptance draws other uniforms than
        plain sampling), so a seeded one drafts as if alone: its text must not
        depend on how busy the server was. Greedy tokens do not depend on the
        draft lengths (lossless bit for bit), nor need unseeded ones."""
        return 1 if self.reproducible else decoding

    @property
    def hidden(self) -> bool:
        """The drafter drafts from the target's hidden state (Score returns it)."""
        return self.drafting and self.method.hidden

    def draft_length(self) -> DraftLength | ClassedLength:
        """The request's adaptive draft length: one per confidence class where the method's chains
        carry one (``MethodSpec.classes``)."""
        def make() -> DraftLength:
            return DraftLength(self.k_max, adaptive=self.adaptive, cost_per_token=self.cost_per_token,
                               overhead=self.method.draft_cost, memory=self.method.acceptance_memory,
                               row_cost=self.row_cost)
        if self.method.classes and self.adaptive and self.candidates <= 1 and self.k_max > 0:
            return ClassedLength(make)
        return make()

    def score(self, token_ids: list[int], start: int, **fields) -> bpb.ScoreRequest:
        """A Score call of this request: greedy asks only for the argmax (unless it reports
        log-probabilities or processes the logits); max_positions and the salt go with every call (a resume
        on another replica reserves and reads by them)."""
        return bpb.ScoreRequest(token_ids=token_ids, start=start,
                                argmax_only=self.sampling.greedy and self.logprobs is None and not self.processors.active,
                                return_hidden=self.hidden, max_positions=self.max_positions,
                                cache_salt=self.cache_salt, **self.ids, **fields)

    def anchor(self, out: bpb.ScoreResponse, row: int) -> TensorProto | None:
        """The hidden state [dim] at scored row ``row`` (the position that decided the pending token),
        for methods that draft from it; else None."""
        return proto_row(out.hidden, row) if self.hidden else None

    def target(self, out: bpb.ScoreResponse, tokens: list[int], draft: dpb.Draft | None = None
               ) -> torch.Tensor | RowProbs:
        """What the acceptance rules read of a Score call: greedy requests the argmax ids ([m] int64),
        others the [m, vocab] distributions, each row computed when a rule first reads it. With logits
        processors, of the processed logits: row r after the generated tokens (``tokens``: the committed
        ones, prompt first) and the ``draft``'s path to it (``paths``; no draft: one row)."""
        if not self.processors.active:
            if self.sampling.greedy:  # the backbone's argmax, or the logits' where the request reports logprobs
                return torch.tensor(list(out.argmax), dtype=torch.long) if out.argmax else \
                    from_proto(out.logits).argmax(-1)
            return RowProbs(from_proto(out.logits), self.sampling)
        after = paths(draft) if draft is not None else [[]]
        try:
            logits = self.processors.apply(from_proto(out.logits), tokens[len(self.prompt):], after)  # [m, vocab]
        except ValueError as e:  # a token id outside the vocabulary
            raise InvalidArgument(str(e)) from None
        return logits.argmax(-1) if self.sampling.greedy else RowProbs(logits, self.sampling)

    def logprobs_of(self, out: bpb.ScoreResponse, rows: list[int], tokens: list[int]) -> list[gpb.TokenLogprob]:
        """The log-probabilities of ``tokens``, decided by the scored rows ``rows`` (``logprobs``);
        empty when the request asks for none."""
        if self.logprobs is None:
            return []
        return token_logprobs(from_proto(out.logits), rows, tokens, self.logprobs)


def paths(draft: dpb.Draft) -> list[list[int]]:
    """The draft tokens between the pending token and each scored row: none
    before row 0, node i's path from the root (node i included) before row
    i + 1 (a chain's first i + 1 tokens)."""
    out: list[list[int]] = [[]]
    for i, token in enumerate(draft.token_ids):
        parent = draft.parents[i] if draft.parents else i - 1
        out.append(out[parent + 1] + [int(token)])
    return out
