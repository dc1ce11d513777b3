"""Plain results of the SDK, and how requests are built (one place for the
sync and the asyncio client)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import grpc

from .errors import InvalidArgument
from .v1 import generation_pb2 as pb

FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_EOS: "eos"}


@dataclass
class Stats:
    """Usage, timing and speculative counters of a finished request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the shared KV tiers (0 unless the
    # request set cache_salt or the server reports it to everyone: report_cached_tokens)
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    tokens_per_second: float = 0.0
    method: str = ""
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    rounds: int = 0
    mean_accepted_length: float = 0.0
    drafted_at: list[int] = field(default_factory=list)  # per draft position: rounds that drafted there
    accepted_at: list[int] = field(default_factory=list)  # and rounds whose accepted path reached it

    @property
    def acceptance_by_position(self) -> list[float]:
        """How often the i-th drafted token was accepted (Medusa's and Hydra's per-head acceptance)."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]

    @classmethod
    def from_proto(cls, msg) -> "Stats":
        return cls(
            prompt_tokens=msg.usage.prompt_tokens, completion_tokens=msg.usage.completion_tokens,
            cached_prompt_tokens=msg.usage.cached_prompt_tokens,
            time_to_first_token_s=msg.timing.time_to_first_token_s, total_s=msg.timing.total_s,
            tokens_per_second=msg.timing.tokens_per_second, method=msg.speculative.method,
            drafted_tokens=msg.speculative.drafted_tokens, accepted_tokens=msg.speculative.accepted_tokens,
            rounds=msg.speculative.rounds, mean_accepted_length=msg.speculative.mean_accepted_length,
            drafted_at=list(msg.speculative.drafted_at), accepted_at=list(msg.speculative.accepted_at),
        )


@dataclass
class Logprob:
    """A token's log-probability under the target model (``logprobs=`` of
    ``generate`` and ``stream``); ``top``: the most likely tokens at its
    position, most likely first (their own ``top`` empty)."""

    token_id: int
    logprob: float
    token: bytes  # the token's bytes (part of a UTF-8 character where a character spans tokens)
    top: list["Logprob"] = field(default_factory=list)

    @classmethod
    def from_proto(cls, lp) -> "Logprob":
        return cls(lp.token_id, lp.logprob, lp.token, [cls(t.token_id, t.logprob, t.token) for t in lp.top])


@dataclass
class Completion:
    """The result of ``generate``."""

    request_id: str
    model: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "length", "stop" or "eos"
    stats: Stats = field(default_factory=Stats)
    logprobs: list[Logprob] = field(default_factory=list)  # one per token id, with logprobs=

    @classmethod
    def from_proto(cls, r: pb.GenerateResponse) -> "Completion":
        return cls(r.request_id, r.model, r.text, list(r.token_ids), FINISH.get(r.finish_reason, ""),
                   Stats.from_proto(r), [Logprob.from_proto(lp) for lp in r.logprobs])


@dataclass
class Chunk:
    """A piece of ``stream``; the last one has ``finish_reason`` and ``stats``
    (a stream that ends without it raises ``Unavailable``)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stats: Stats | None = None
    request_id: str = ""  # the request's request_id, echoed
    logprobs: list[Logprob] = field(default_factory=list)  # one per token id, with logprobs=

    @classmethod
    def from_proto(cls, c: pb.GenerateChunk) -> "Chunk":
        done = c.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        return cls(c.text, list(c.token_ids), FINISH.get(c.finish_reason) if done else None,
                   Stats.from_proto(c) if done else None, c.request_id,
                   [Logprob.from_proto(lp) for lp in c.logprobs])


def build_request(
    prompt: str | None = None,
    messages: Iterable[Mapping[str, str]] | None = None,
    *,
    model: str = "",
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: str | Iterable[str] | None = (),
    logprobs: int | None = None,
    ignore_eos: bool | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    logit_bias: Mapping[int, float] | None = None,
    min_tokens: int | None = None,
    speculative: str = "",
    num_draft_tokens: int | None = None,
    num_candidates: int | None = None,
    adaptive: bool | None = None,
    request_id: str = "",
    cache_salt: str | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest; unset options take the server's defaults.
    ``cache_salt``: the namespace of this request's cached prompt prefixes
    (shared only with requests sending the same salt; also reports
    ``cached_prompt_tokens``). ``stop``: one string or several (None: none).
    ``logprobs``: report each token's log-probability and this many most
    likely tokens beside it (0: its own alone; at most 20). ``ignore_eos``:
    generate to ``max_tokens`` past the end-of-sequence token.
    ``presence_penalty``, ``frequency_penalty``: OpenAI's, -2 to 2.
    ``logit_bias``: token id -> -100 to 100 added to its logit. ``min_tokens``:
    the end-of-sequence token cannot come sooner. A value the
    request cannot hold (a negative ``max_tokens``, a string for a number)
    raises ``InvalidArgument`` naming the option, before anything is sent."""
    sampling = pb.SamplingParams()
    _extend(sampling.stop, "stop", [stop] if isinstance(stop, str) else list(stop or ()))
    _set(sampling, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
         logprobs=logprobs, ignore_eos=ignore_eos, presence_penalty=presence_penalty,
         frequency_penalty=frequency_penalty, min_tokens=min_tokens)
    try:
        sampling.logit_bias.update(logit_bias or {})
    except (TypeError, ValueError) as e:
        raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT,
                              f"logit_bias: token id -> bias ({e!r}, got {logit_bias!r})") from None
    spec = pb.SpeculativeParams(method=speculative)
    _set(spec, num_draft_tokens=num_draft_tokens, num_candidates=num_candidates, adaptive=adaptive)
    req = pb.GenerateRequest(sampling=sampling, speculative=spec)
    _set(req, request_id=request_id, model=model, prompt=prompt or "", cache_salt=cache_salt)
    for i, m in enumerate(messages or []):
        try:
            req.messages.append(pb.ChatMessage(role=m["role"], content=m["content"]))
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"messages[{i}]: a mapping with string 'role' and 'content' ({e!r})") from None
    return req


@dataclass
class Image:
    """One generated image: PNG bytes, its class, and its pixels (and tokens
    when asked for) as flat lists."""

    label: int
    png: bytes
    height: int
    width: int
    channels: int
    pixels: list[float]  # [channels * height * width] in [0, 1], row-major
    tokens: list[float]  # [num_tokens * token_dim], when return_tokens


@dataclass
class ImageResult:
    """The result of ``generate_image``."""

    request_id: str
    model: str
    images: list[Image]
    stats: Stats = field(default_factory=Stats)

    @classmethod
    def from_proto(cls, r: pb.GenerateImageResponse) -> "ImageResult":
        images = [Image(i.label, i.png, i.height, i.width, i.channels, list(i.pixels), list(i.tokens))
                  for i in r.images]
        return cls(r.request_id, r.model, images, Stats.from_proto(r))


def build_image_request(
    labels: Iterable[int],
    *,
    model: str = "",
    seed: int | None = None,
    temperature: float | None = None,
    cfg_scale: float | None = None,
    num_steps: int | None = None,
    speculative: str = "",
    num_draft_tokens: int | None = None,
    adaptive: bool | None = None,
    return_tokens: bool = False,
    request_id: str = "",
) -> pb.GenerateImageRequest:
    """A GenerateImageRequest: one image per label; unset options take the model's defaults."""
    req = pb.GenerateImageRequest(speculative=pb.SpeculativeParams())
    _extend(req.labels, "labels", list(labels))
    _set(req, request_id=request_id, model=model, return_tokens=return_tokens)
    _set(req.speculative, method=speculative)
    _set(req, seed=seed, temperature=temperature, cfg_scale=cfg_scale, num_steps=num_steps)
    _set(req.speculative, num_draft_tokens=num_draft_tokens, adaptive=adaptive)
    return req


def _extend(field, name: str, values: list) -> None:
    try:
        field.extend(values)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {e} (got {values!r})") from None


def _set(msg, **values) -> None:
    """Set the options that are not None on a protobuf message; a value its
    field cannot hold is the caller's mistake (InvalidArgument), not the
    protobuf runtime's ValueError."""
    for name, value in values.items():
        if value is None:
            continue
        try:
            setattr(msg, name, value)
        except (TypeError, ValueError) as e:
            raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {e} (got {value!r})") from None
