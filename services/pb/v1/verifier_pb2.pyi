from arserve_client.v1 import generation_pb2 as _generation_pb2
from arserve_client.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VerifyRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt_token_ids", "sampling", "speculative", "cache_salt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _generation_pb2.SamplingParams
    speculative: _generation_pb2.SpeculativeParams
    cache_salt: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., speculative: _Optional[_Union[_generation_pb2.SpeculativeParams, _Mapping]] = ..., cache_salt: _Optional[str] = ...) -> None: ...

class VerifyEvent(_message.Message):
    __slots__ = ("token_ids", "finish_reason", "speculative", "cached_prompt_tokens", "logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _generation_pb2.FinishReason
    speculative: _generation_pb2.SpeculativeStats
    cached_prompt_tokens: int
    logprobs: _containers.RepeatedCompositeFieldContainer[_generation_pb2.TokenLogprob]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_generation_pb2.FinishReason, str]] = ..., speculative: _Optional[_Union[_generation_pb2.SpeculativeStats, _Mapping]] = ..., cached_prompt_tokens: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[_generation_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class VerifyImageRequest(_message.Message):
    __slots__ = ("request_id", "model", "labels", "temperature", "cfg", "num_steps", "method", "num_draft_tokens", "seed", "adaptive", "prior_rate", "round_costs_batch1", "round_costs_batch32")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    CFG_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    PRIOR_RATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_COSTS_BATCH1_FIELD_NUMBER: _ClassVar[int]
    ROUND_COSTS_BATCH32_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    labels: _containers.RepeatedScalarFieldContainer[int]
    temperature: float
    cfg: float
    num_steps: int
    method: str
    num_draft_tokens: int
    seed: int
    adaptive: bool
    prior_rate: float
    round_costs_batch1: _containers.RepeatedScalarFieldContainer[float]
    round_costs_batch32: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., labels: _Optional[_Iterable[int]] = ..., temperature: _Optional[float] = ..., cfg: _Optional[float] = ..., num_steps: _Optional[int] = ..., method: _Optional[str] = ..., num_draft_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., adaptive: _Optional[bool] = ..., prior_rate: _Optional[float] = ..., round_costs_batch1: _Optional[_Iterable[float]] = ..., round_costs_batch32: _Optional[_Iterable[float]] = ...) -> None: ...

class VerifyImageResponse(_message.Message):
    __slots__ = ("tokens", "drafted", "accepted", "rounds", "mean_accepted_length")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACCEPTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    tokens: _tensor_pb2.Tensor
    drafted: int
    accepted: int
    rounds: int
    mean_accepted_length: float
    def __init__(self, tokens: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., drafted: _Optional[int] = ..., accepted: _Optional[int] = ..., rounds: _Optional[int] = ..., mean_accepted_length: _Optional[float] = ...) -> None: ...
