from arserve_client.v1 import generation_pb2 as _generation_pb2
from arserve_client.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProposeRequest(_message.Message):
    __slots__ = ("request_id", "model", "method", "new_token_ids", "committed_length", "num_draft_tokens", "num_candidates", "sampling", "seed", "hidden", "image")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    method: str
    new_token_ids: _containers.RepeatedScalarFieldContainer[int]
    committed_length: int
    num_draft_tokens: int
    num_candidates: int
    sampling: _generation_pb2.SamplingParams
    seed: int
    hidden: _tensor_pb2.Tensor
    image: ImageDraftRequest
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., method: _Optional[str] = ..., new_token_ids: _Optional[_Iterable[int]] = ..., committed_length: _Optional[int] = ..., num_draft_tokens: _Optional[int] = ..., num_candidates: _Optional[int] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., image: _Optional[_Union[ImageDraftRequest, _Mapping]] = ...) -> None: ...

class ImageDraftRequest(_message.Message):
    __slots__ = ("labels", "lengths", "pending", "noise", "temperature", "cfg", "num_steps", "capacity")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    CFG_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedScalarFieldContainer[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    pending: _tensor_pb2.Tensor
    noise: _tensor_pb2.Tensor
    temperature: float
    cfg: float
    num_steps: int
    capacity: int
    def __init__(self, labels: _Optional[_Iterable[int]] = ..., lengths: _Optional[_Iterable[int]] = ..., pending: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., noise: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., temperature: _Optional[float] = ..., cfg: _Optional[float] = ..., num_steps: _Optional[int] = ..., capacity: _Optional[int] = ...) -> None: ...

class Draft(_message.Message):
    __slots__ = ("token_ids", "parents", "probs", "tokens", "states", "log_density", "z", "confidence")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    LOG_DENSITY_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    probs: _tensor_pb2.Tensor
    tokens: _tensor_pb2.Tensor
    states: _tensor_pb2.Tensor
    log_density: _tensor_pb2.Tensor
    z: _tensor_pb2.Tensor
    confidence: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ..., probs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., tokens: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., states: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., log_density: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., z: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., confidence: _Optional[int] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("draft",)
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    draft: Draft
    def __init__(self, draft: _Optional[_Union[Draft, _Mapping]] = ...) -> None: ...

class DrafterReleaseRequest(_message.Message):
    __slots__ = ("request_id", "method", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    method: str
    model: str
    def __init__(self, request_id: _Optional[str] = ..., method: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class DrafterReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ProposeManyRequest(_message.Message):
    __slots__ = ("calls",)
    CALLS_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedCompositeFieldContainer[ProposeRequest]
    def __init__(self, calls: _Optional[_Iterable[_Union[ProposeRequest, _Mapping]]] = ...) -> None: ...

class ProposeManyResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ProposeResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ProposeResult, _Mapping]]] = ...) -> None: ...

class ProposeResult(_message.Message):
    __slots__ = ("response", "code", "message")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    response: ProposeResponse
    code: str
    message: str
    def __init__(self, response: _Optional[_Union[ProposeResponse, _Mapping]] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
