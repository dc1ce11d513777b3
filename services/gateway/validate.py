"""Request validation at the public edge: every problem becomes an
InvalidArgument or NotFound whose message names the field."""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable

from arserve_client.v1 import generation_pb2 as pb

from ..core.diffusion_head import MAX_CFG, TEMPERATURE_RANGE, TRAIN_STEPS
from ..core.logits_processors import BIAS_RANGE, MAX_BIASED_TOKENS, PENALTY_RANGE
from ..errors import InvalidArgument, NotFound
from ..settings import ImageModelSettings, ModelSettings
from ..tokenizer.text import ROLES
from ..verifier.logprobs import MAX_LOGPROBS
from ..vllm_engine.params import check_request as check_vllm_request

MAX_STOP_STRINGS = 16
MAX_DRAFT_TOKENS = 16
MAX_CANDIDATES = 8
MAX_STOP_LENGTH = 256
MAX_CACHE_SALT_BYTES = 256
MAX_REQUEST_ID_LENGTH = 128  # characters of a client's request_id (it is echoed back, never a key)


def quoted(name: str, limit: int = MAX_REQUEST_ID_LENGTH) -> str:
    """A name the client sent (a model id, a role, a method), quoted for an
    error message: at most ``limit`` characters of it (a 10,000-character
    model id came back whole)."""
    return repr(name) if len(name) <= limit else f"{name[:limit]!r}... ({len(name)} characters)"


def resolve_model(req: pb.GenerateRequest, models: dict[str, ModelSettings], default: str,
                  image_models: Iterable[str] = ()) -> ModelSettings:
    """The text model a request names (NOT_FOUND, as OpenAI answers a chat call to a non-chat model,
    naming what it is where it is an image model)."""
    name = req.model or default
    if name in models:
        return models[name]
    if name in image_models:
        raise NotFound(f"model {name!r} is an image model: ask it for images (GenerateImage, "
                       f"POST /v1/images/generations); text models: {sorted(models)}")
    raise NotFound(f"model {quoted(req.model)} is not served; known: {sorted(models)}")


def check_size(req: pb.GenerateRequest, max_prompt_bytes: int) -> None:
    """Refuse an oversized prompt before any work is spent on it."""
    size = len(req.prompt.encode()) + sum(len(m.content.encode()) + len(m.role.encode()) for m in req.messages)
    if size > max_prompt_bytes:
        raise InvalidArgument(f"prompt is {size} bytes; this server takes at most {max_prompt_bytes}")


def check_request_id(request_id: str) -> None:
    """The client's request_id is a label the server echoes back; it names
    no server state (that is keyed on an id the gateway generates), so any
    value is safe but an unbounded one would bloat every response and log."""
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgument(f"request_id is {len(request_id)} characters; at most {MAX_REQUEST_ID_LENGTH}")
    control = next((i for i, c in enumerate(request_id) if unicodedata.category(c) == "Cc"), None)
    if control is not None:  # a newline or an escape would forge lines in the logs that echo it
        raise InvalidArgument(f"request_id holds a control character ({request_id[control]!r} at {control}); "
                              f"use printable characters")


def check_request(req: pb.GenerateRequest, model: ModelSettings) -> None:
    """Everything that can be checked before tokenizing."""
    check_request_id(req.request_id)
    if not req.prompt and not req.messages:
        raise InvalidArgument("prompt or messages is required (both are empty)")
    if req.prompt and req.messages:
        raise InvalidArgument("give either prompt or messages, not both")
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role {quoted(m.role)} is not one of {list(ROLES)}")
    s = req.sampling
    if s.HasField("max_tokens") and s.max_tokens == 0:
        raise InvalidArgument("sampling.max_tokens must be at least 1")
    if s.HasField("temperature") and not (math.isfinite(s.temperature) and s.temperature >= 0):
        raise InvalidArgument(f"sampling.temperature must be finite and >= 0, got {s.temperature}")
    if s.HasField("top_p") and not (0 < s.top_p <= 1):  # NaN fails too
        raise InvalidArgument(f"sampling.top_p must be in (0, 1], got {s.top_p}")
    low, high = PENALTY_RANGE
    for name in ("presence_penalty", "frequency_penalty"):
        if s.HasField(name) and not low <= getattr(s, name) <= high:  # NaN fails too
            raise InvalidArgument(f"sampling.{name} must be {low:g} to {high:g}, got {getattr(s, name):g}")
    if len(s.logit_bias) > MAX_BIASED_TOKENS:
        raise InvalidArgument(f"sampling.logit_bias biases {len(s.logit_bias)} tokens; at most {MAX_BIASED_TOKENS}")
    low, high = BIAS_RANGE
    for token, bias in s.logit_bias.items():
        if not low <= bias <= high:  # NaN fails too
            raise InvalidArgument(f"sampling.logit_bias[{token}] must be {low:g} to {high:g}, got {bias:g}")
    if s.HasField("logprobs") and s.logprobs > MAX_LOGPROBS:
        raise InvalidArgument(f"sampling.logprobs must be at most {MAX_LOGPROBS}, got {s.logprobs}")
    if len(s.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"sampling.stop has {len(s.stop)} strings; at most {MAX_STOP_STRINGS}")
    for i, stop in enumerate(s.stop):
        if not stop or len(stop) > MAX_STOP_LENGTH:
            raise InvalidArgument(f"sampling.stop[{i}] must be 1 to {MAX_STOP_LENGTH} characters")
    if req.HasField("cache_salt") and not 1 <= len(req.cache_salt.encode()) <= MAX_CACHE_SALT_BYTES:
        raise InvalidArgument(f"cache_salt must be 1 to {MAX_CACHE_SALT_BYTES} UTF-8 bytes, "
                              f"got {len(req.cache_salt.encode())}")
    spec = req.speculative
    if spec.HasField("num_draft_tokens") and spec.num_draft_tokens > MAX_DRAFT_TOKENS:
        raise InvalidArgument(f"speculative.num_draft_tokens must be at most {MAX_DRAFT_TOKENS}, got {spec.num_draft_tokens}")
    if spec.HasField("num_candidates") and not 1 <= spec.num_candidates <= MAX_CANDIDATES:
        raise InvalidArgument(f"speculative.num_candidates must be 1 to {MAX_CANDIDATES}, got {spec.num_candidates}")
    if model.engine == "vllm":
        check_vllm_request(req, model)
    method = req.speculative.method or model.default_speculative_method
    if method not in model.speculative_methods:
        raise InvalidArgument(
            f"speculative.method {quoted(req.speculative.method)} is not available for model {model.id!r}; "
            f"choose one of {model.speculative_methods}"
        )


def resolve_max_tokens(req: pb.GenerateRequest, model: ModelSettings, prompt_tokens: int, window: int) -> int:
    """max_tokens after the prompt is known: explicit values must fit the
    context window; the default is capped by it."""
    room = window - prompt_tokens
    if room < 1:
        raise InvalidArgument(f"prompt is {prompt_tokens} tokens; the context window is {window} tokens")
    s = req.sampling
    if not s.HasField("max_tokens"):  # the default, raised to min_tokens where that asks for more
        resolved = min(max(model.default_max_tokens, s.min_tokens), room)
    elif s.max_tokens > room:
        raise InvalidArgument(
            f"sampling.max_tokens {s.max_tokens} exceeds the context window: "
            f"{prompt_tokens} prompt tokens + {s.max_tokens} > {window}"
        )
    else:
        resolved = s.max_tokens
    if s.min_tokens > resolved:
        raise InvalidArgument(f"sampling.min_tokens {s.min_tokens} is more than max_tokens ({resolved})"
                              if s.HasField("max_tokens") else f"sampling.min_tokens {s.min_tokens} exceeds the "
                              f"context window: {prompt_tokens} prompt tokens + {s.min_tokens} > {window}")
    return resolved


def check_vocabulary(req: pb.GenerateRequest, vocab: int) -> None:
    """Token ids a request names (logit_bias) against the model's vocabulary."""
    outside = [t for t in req.sampling.logit_bias if t >= vocab]
    if outside:
        raise InvalidArgument(f"sampling.logit_bias: token id {min(outside)} is outside the vocabulary ({vocab})")


def check_image_request(req: pb.GenerateImageRequest, model: ImageModelSettings, num_classes: int,
                        max_images: int) -> None:
    """Every field of a GenerateImage request, before any work is spent."""
    check_request_id(req.request_id)
    if not req.labels:
        raise InvalidArgument("labels is empty: give one class label per image")
    if len(req.labels) > max_images:
        raise InvalidArgument(f"labels asks for {len(req.labels)} images; this server takes at most {max_images} "
                              f"per request (max_images_per_request)")
    for i, label in enumerate(req.labels):
        if label >= num_classes:
            raise InvalidArgument(f"labels[{i}] = {label} is not a class of model {model.id!r} (0 to {num_classes - 1})")
    low, high = TEMPERATURE_RANGE
    if req.HasField("temperature") and not low <= req.temperature <= high:  # NaN fails too
        raise InvalidArgument(f"temperature must be {low} to {high}, got {req.temperature}")
    if req.HasField("cfg_scale") and not 1 <= req.cfg_scale <= MAX_CFG:
        raise InvalidArgument(f"cfg_scale must be 1 to {MAX_CFG:g}, got {req.cfg_scale:g}")
    if req.HasField("num_steps") and not 1 <= req.num_steps <= TRAIN_STEPS:
        raise InvalidArgument(f"num_steps must be 1 to {TRAIN_STEPS}, got {req.num_steps}")
    spec = req.speculative
    if spec.HasField("num_draft_tokens") and spec.num_draft_tokens > MAX_DRAFT_TOKENS:  # 0: plain rounds, as for text
        raise InvalidArgument(f"speculative.num_draft_tokens must be at most {MAX_DRAFT_TOKENS}, got {spec.num_draft_tokens}")
    if spec.HasField("num_candidates") and spec.num_candidates != 1:
        raise InvalidArgument("speculative.num_candidates does not apply to images (one draft chain per image)")
    method = spec.method or model.default_speculative_method
    if method not in model.speculative_methods:
        raise InvalidArgument(f"speculative.method {quoted(spec.method)} is not available for image model {model.id!r}; "
                              f"choose one of {model.speculative_methods}")
