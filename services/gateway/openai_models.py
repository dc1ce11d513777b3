"""The OpenAI HTTP API's request bodies (chat completions, completions,
image generations) as pydantic models, and their translation to the
gateway's protobuf requests.

Only what the wire needs is checked here (types, and integer ranges that
must fit the protobuf fields); every limit the gateway knows (top_p range,
stop strings, speculative methods, context window, ...) stays in
``gateway.validate`` so both front doors refuse the same requests with the
same messages. arserve's own options ride as extra body fields, as vLLM
takes its extra sampling parameters (the ``openai`` package's
``extra_body``): ``top_k``, ``speculative`` (the method), ``num_draft_tokens``,
``cache_salt`` (the tenant's namespace of shared KV blocks, vLLM's option),
``ignore_eos``, ``min_tokens`` (vLLM's);
for images ``seed``, ``steps``, ``guidance``, ``temperature``, ``speculative``.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from arserve_client.v1 import generation_pb2 as pb

from ..errors import InvalidArgument
from ..verifier.logprobs import MAX_LOGPROBS
from .validate import quoted

UINT32 = (1 << 32) - 1
FLOAT32_MAX = 3.4028234663852886e38  # the protobuf float fields' largest finite value
UINT64 = (1 << 64) - 1
INT64_MIN = -(1 << 63)  # vLLM's seed range starts here; a negative seed is its 64-bit two's complement
MAX_IMAGES_ASKED = 1 << 16  # bounds n before the gateway's own limit (max_images_per_request) answers
MAX_CHOICES = 64  # most choices one completion request fans out to (n times its prompts); each is a request


# The OpenAI body field that a gateway message's leading field path came from ("sampling.top_p must be ...",
# "messages[0].role ..."): the ``param`` of an HTTP error, as OpenAI names the parameter. Messages keep the
# gRPC names, which both doors share.
OPENAI_PARAMS = {
    "sampling.max_tokens": "max_tokens", "sampling.temperature": "temperature", "sampling.top_p": "top_p",
    "sampling.presence_penalty": "presence_penalty", "sampling.frequency_penalty": "frequency_penalty",
    "sampling.logit_bias": "logit_bias", "sampling.min_tokens": "min_tokens",
    "sampling.top_k": "top_k", "sampling.seed": "seed", "sampling.stop": "stop", "speculative.method": "speculative",
    "speculative.num_draft_tokens": "num_draft_tokens", "cache_salt": "cache_salt", "prompt": "prompt",
    "messages": "messages", "request_id": "request_id", "num_steps": "steps", "cfg_scale": "guidance",
    "temperature": "temperature",
    "labels": "n", "labels[]": "prompt",  # how many images; one image's class (the prompt names it)
}
OPENAI_PARAMS.update({name: name for name in (  # the HTTP door's own refusals name OpenAI's parameters
    "n", "logprobs", "top_logprobs", "response_format", "presence_penalty", "frequency_penalty", "logit_bias",
    "tools", "tool_choice", "functions", "function_call", "echo", "best_of", "suffix", "size", "stream_options",
    "max_completion_tokens", "prompt_logprobs")})
_LEADING_FIELD = re.compile(r"([a-z_]+(?:\.[a-z_]+)?)((?:\[\d+\])?(?:\.[a-z_]+)?)")


def refusal(message: str, param: str | None) -> InvalidArgument:
    """INVALID_ARGUMENT naming ``param``, the OpenAI parameter an HTTP error's ``param`` gives (None: the body)."""
    err = InvalidArgument(message)
    err.param = param
    return err


def param_of(message: str) -> str | None:
    """The OpenAI parameter a gateway INVALID_ARGUMENT message names first, or None."""
    m = _LEADING_FIELD.match(message)
    if m is None:
        return None
    indexed = m.group(1) + "[]"
    param = OPENAI_PARAMS.get(indexed if m.group(2).startswith("[") and indexed in OPENAI_PARAMS else m.group(1))
    if param == "messages" and m.group(2):  # messages[0].role -> messages.0.role, as pydantic's loc reads
        param += "." + m.group(2).strip("[").replace("]", "")
    return param


def check_encodable(value, path: str = "") -> None:
    """Refuse a string that UTF-8 cannot encode, naming its field: JSON may
    spell a lone surrogate (``"\\ud800"``), which no protobuf string holds."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError as e:
            raise refusal(f"{path or 'body'}: not valid Unicode text: a lone surrogate {value[e.start]!r} at "
                          f"character {e.start}", path or None) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_encodable(key, path)
            check_encodable(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_encodable(item, f"{path}.{i}")


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="Send one more chunk before [DONE] with the usage.")


class GenerationBody(BaseModel):
    """Fields chat completions and completions share. Unknown fields are
    ignored (OpenAI clients send ``user`` and the like); the ones that would
    change the answer and are not served are refused by ``refuse_unserved``."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Model id (default: the server's first text model).")
    max_tokens: int | None = Field(None, ge=1, le=UINT32, description="Most completion tokens.")
    temperature: float | None = Field(None, description="0 is greedy; unset: arserve's default, greedy.")
    top_p: float | None = Field(None, description="Nucleus sampling mass in (0, 1].")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (a string, as JSON keys are) -> "
                                                "-100 to 100 added to its logit.")
    presence_penalty: float | None = Field(None, description="-2 to 2: subtracted from the logit of each token "
                                           "the output holds.")
    frequency_penalty: float | None = Field(None, description="-2 to 2: subtracted once per time the output "
                                            "holds a token.")
    seed: int | None = Field(None, ge=INT64_MIN, le=UINT64, description="Seed of the request's sampler "
                             "(a negative one as its 64-bit two's complement).")
    stop: str | list[str] | None = Field(None, description="Stop strings (not included in the text).")
    n: int | None = Field(1, description="Choices per prompt (null: 1), each decoded as a request of its own; "
                          "with a seed, choice j samples with seed + j (as vLLM seeds them).")
    stream: bool | None = Field(False, description="Answer with server-sent events, ending in data: [DONE] "
                                "(null: false).")
    stream_options: StreamOptions | None = None
    logprobs: StrictBool | StrictInt | None = Field(None, description="Chat: true reports each token's log-probability "
                                        "(with top_logprobs); completions: the number of most likely tokens "
                                        "reported beside the chosen one.")
    # What OpenAI defines and arserve does not serve: refused when set to anything but the neutral value.
    response_format: dict | None = None
    prompt_logprobs: int | None = None  # vLLM's: the prompt's log-probabilities (not served)
    tool_choice: str | dict | None = None
    functions: list | None = None  # tools' older spelling
    function_call: str | dict | None = None
    # arserve's own (extra_body)
    top_k: int | None = Field(None, ge=-1, le=UINT32, description="Top-k sampling; 0 or -1: off (vLLM's spelling).")
    speculative: str | None = Field(None, description="Speculative method (none, ngram, draft_model, heads; "
                                    "default: the model's).")
    num_draft_tokens: int | None = Field(None, ge=0, le=UINT32, description="Draft length (the adaptive bound).")
    cache_salt: str | None = Field(None, description="Namespace of this request's shared KV blocks (vLLM's "
                                   "cache_salt): prefixes are shared only with requests sending the same salt.")
    min_tokens: int | None = Field(None, ge=0, le=UINT32, description="The end-of-sequence token cannot come "
                                   "before this many tokens (vLLM's option).")
    ignore_eos: StrictBool | None = Field(None, description="Generate to max_tokens past the end-of-sequence "
                                          "token (vLLM's option, for benchmarks).")

    @model_validator(mode="after")
    def _nulls_mean_defaults(self):
        """OpenAI's spec lets a client send null for these; it means the default."""
        self.n = 1 if self.n is None else self.n
        self.stream = bool(self.stream)
        return self

    def refuse_unserved(self) -> None:
        if self.n < 1:
            raise InvalidArgument(f"n: choices per prompt must be at least 1, got {self.n}")
        if self.stream_options is not None and not self.stream:
            raise InvalidArgument("stream_options: only allowed when stream is true")
        if self.functions or self.function_call not in (None, "none"):
            raise InvalidArgument(f"{'functions' if self.functions else 'function_call'}: function calling is "
                                  f"not served by arserve")
        if self.tool_choice not in (None, "none"):
            raise InvalidArgument(f"tool_choice: tool calling is not served by arserve, got {self.tool_choice!r}")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise InvalidArgument(f"response_format: only text is served, got {self.response_format.get('type')!r}")
        if self.prompt_logprobs is not None:
            raise InvalidArgument("prompt_logprobs: the prompt's log-probabilities are not served by arserve "
                                  "(logprobs reports the generated tokens')")

    def sent_as(self, param: str | None) -> str | None:
        """The name this body gave the parameter an error names (``param``)."""
        return param

    def logprobs_asked(self) -> int | None:
        """SamplingParams.logprobs: the most likely tokens reported beside each chosen token's
        log-probability; None: no log-probabilities."""
        return None

    @staticmethod
    def _top_count(name: str, value) -> int:
        if isinstance(value, bool) or not 0 <= value <= MAX_LOGPROBS:
            raise refusal(f"{name}: the number of most likely tokens to report, 0 to {MAX_LOGPROBS}, got "
                          f"{value!r}", name)
        return value

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_proto(self, max_tokens: int | None) -> pb.GenerateRequest:
        """The gateway's request, without prompt or messages."""
        self.refuse_unserved()
        sampling = pb.SamplingParams()
        if max_tokens is not None:
            sampling.max_tokens = max_tokens
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None:
                if abs(value) > FLOAT32_MAX and value not in (math.inf, -math.inf):  # would arrive as inf
                    raise InvalidArgument(f"{name}: {value!r} is beyond the range of a 32-bit float")
                setattr(sampling, name, value)
        if self.seed is not None:
            sampling.seed = self.seed & UINT64
        if self.top_k is not None and self.top_k > 0:
            sampling.top_k = self.top_k
        if self.ignore_eos:
            sampling.ignore_eos = True
        if self.min_tokens:
            sampling.min_tokens = self.min_tokens
        for token, bias in (self.logit_bias or {}).items():
            if not (token.isascii() and token.isdecimal() and len(token) <= 10) or int(token) > UINT32:
                raise refusal(f"logit_bias: keys are token ids, got {quoted(token)}", "logit_bias")
            if abs(bias) > FLOAT32_MAX:
                raise refusal(f"logit_bias: {bias!r} is beyond the range of a 32-bit float", "logit_bias")
            sampling.logit_bias[int(token)] = bias
        if (logprobs := self.logprobs_asked()) is not None:
            sampling.logprobs = logprobs
        if self.stop is not None:
            sampling.stop.extend([self.stop] if isinstance(self.stop, str) else self.stop)
        speculative = pb.SpeculativeParams(method=self.speculative or "")
        if self.num_draft_tokens is not None:
            speculative.num_draft_tokens = self.num_draft_tokens
        return pb.GenerateRequest(model=self.model or "", sampling=sampling, speculative=speculative,
                                  cache_salt=self.cache_salt)

    def choices(self, prompts: list[pb.GenerateRequest], param: str) -> list[pb.GenerateRequest]:
        """One request per choice, prompt by prompt (choice i answers prompt i // n, as OpenAI orders them):
        ``n`` copies of each prompt's request, copy j seeded seed + j where a seed is set."""
        if len(prompts) * self.n > MAX_CHOICES:
            raise refusal(f"{param}: at most {MAX_CHOICES} choices a request (n times the prompts), got "
                          f"{len(prompts)} prompt(s) x n={self.n}; send more requests", param)
        out = []
        for req in prompts:
            for j in range(self.n):
                choice = pb.GenerateRequest()
                choice.CopyFrom(req)
                if j and choice.sampling.HasField("seed"):
                    choice.sampling.seed = (choice.sampling.seed + j) & UINT64
                out.append(choice)
        return out


class TextPart(BaseModel):
    type: Literal["text"] = Field(..., description="Only text parts are served.")
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, ...

    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionBody(GenerationBody):
    messages: list[Message] = Field(..., description="The conversation; the chat template is applied.")
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32, description="max_tokens' newer name; "
                                              "wins when both are set.")
    tools: list | None = None
    top_logprobs: StrictInt | None = Field(None, description="With logprobs: the most likely tokens reported at "
                                     "each position (0 to 20).")

    def logprobs_asked(self) -> int | None:
        """OpenAI's chat: ``logprobs`` true reports the chosen tokens', ``top_logprobs`` counts the others."""
        if self.logprobs not in (None, True, False):  # 0 and 1 read as false and true, as pydantic's bool reads them
            raise refusal(f"logprobs: true or false in chat completions (top_logprobs counts the most likely "
                          f"tokens), got {self.logprobs!r}", "logprobs")
        if not self.logprobs:
            if self.top_logprobs:
                raise refusal("top_logprobs: set logprobs to true to use it", "top_logprobs")
            return None
        return self._top_count("top_logprobs", self.top_logprobs or 0)

    def sent_as(self, param: str | None) -> str | None:
        return "max_completion_tokens" if param == "max_tokens" and self.max_completion_tokens is not None else param

    def to_generate_requests(self) -> list[pb.GenerateRequest]:
        """One request per choice (``choices``)."""
        check_encodable(self.model_dump(exclude_none=True))
        if self.tools:
            raise InvalidArgument("tools: not served by arserve")
        if not self.messages:
            raise InvalidArgument("messages: at least one message is required, got []")
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        req = self.to_proto(limit)
        # OpenAI's newer "developer" role is the system role of older chat templates
        req.messages.extend(pb.ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text())
                            for m in self.messages)
        return self.choices([req], "n")


class CompletionBody(GenerationBody):
    prompt: str | list[str] = Field(..., description="A prompt, or a list of prompts (a batch: their choices "
                                    "in order, n per prompt).")
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None
    top_logprobs: int | None = None  # chat's; refused here, where logprobs counts them

    def logprobs_asked(self) -> int | None:
        """OpenAI's completions: ``logprobs`` counts the most likely tokens reported beside the chosen one."""
        if self.top_logprobs is not None:
            raise refusal("top_logprobs: a chat completions parameter; completions count the most likely "
                          "tokens in logprobs", "top_logprobs")
        if self.logprobs is None or self.logprobs is False:
            return None
        return self._top_count("logprobs", self.logprobs)

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompts(cls, prompt):
        """Token-id prompts (vLLM takes ``[1, 2]`` and ``[[1, 2], [3]]``) are named, not lost in a union's errors."""
        if isinstance(prompt, list) and prompt and all(
                isinstance(p, int) or (isinstance(p, list) and all(isinstance(t, int) for t in p)) for p in prompt):
            raise ValueError("token-id prompts are not served by arserve; send the prompt as text "
                             "(a string, or a list of strings)")
        return prompt

    def to_generate_requests(self) -> list[pb.GenerateRequest]:
        """One request per choice (``choices``)."""
        check_encodable(self.model_dump(exclude_none=True))
        prompts = self.prompt if isinstance(self.prompt, list) else [self.prompt]
        if not prompts:
            raise InvalidArgument("prompt: at least one prompt is required, got []")
        for name, neutral in (("echo", (None, False)), ("best_of", (None, 1)), ("suffix", (None, ""))):
            if getattr(self, name) not in neutral:
                raise InvalidArgument(f"{name}: not served by arserve, got {getattr(self, name)!r}")
        req = self.to_proto(self.max_tokens)
        each = []
        for text in prompts:
            one = pb.GenerateRequest()
            one.CopyFrom(req)
            one.prompt = text
            each.append(one)
        return self.choices(each, "n" if self.n > 1 else "prompt")


class ImageBody(BaseModel):
    """``POST /v1/images/generations`` for a class-conditional image model:
    the prompt names the class (``"7"``)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(..., description="The class label, as a number (e.g. '7').")
    model: str | None = Field(None, description="Image model id (default: the first image model).")
    n: int = Field(1, ge=1, le=MAX_IMAGES_ASKED, description="Images of that class.")
    response_format: str | None = Field("b64_json", description="Only b64_json (PNG bytes in base64).")
    size: str | None = Field(None, description="Unset or auto: the model draws at its one size.")
    seed: int | None = Field(None, ge=0, le=UINT64)
    steps: int | None = Field(None, ge=0, le=UINT32, description="Denoising steps of the diffusion head.")
    guidance: float | None = Field(None, description="Classifier-free guidance scale.")
    temperature: float | None = Field(None, description="Diffusion temperature.")
    speculative: str | None = Field(None, description="none or draft_model (default: the model's).")
    num_draft_tokens: int | None = Field(None, ge=0, le=UINT32)

    def to_generate_image_request(self) -> pb.GenerateImageRequest:
        check_encodable(self.model_dump(exclude_none=True))
        if self.response_format not in (None, "b64_json"):
            raise InvalidArgument(f"response_format: only b64_json is served, got {self.response_format!r}")
        if self.size not in (None, "auto"):
            raise InvalidArgument(f"size: the model draws at its own fixed size; leave size unset or 'auto', "
                                  f"got {self.size!r}")
        label = self.prompt.strip()
        if not (label.isascii() and label.isdecimal()) or int(label) > UINT32:
            raise InvalidArgument(f"prompt: name the class to draw as a number (e.g. '7'), got {self.prompt[:40]!r}")
        req = pb.GenerateImageRequest(model=self.model or "", labels=[int(label)] * self.n,
                                      speculative=pb.SpeculativeParams(method=self.speculative or ""))
        for name, field in (("seed", "seed"), ("steps", "num_steps"), ("guidance", "cfg_scale"),
                            ("temperature", "temperature")):
            if getattr(self, name) is not None:
                setattr(req, field, getattr(self, name))
        if self.num_draft_tokens is not None:
            req.speculative.num_draft_tokens = self.num_draft_tokens
        return req
