from arserve_client.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SampleRequest(_message.Message):
    __slots__ = ("model", "z", "z_uncond", "temperature", "cfg", "num_steps", "seed", "noise", "trajectory", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    Z_UNCOND_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    CFG_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    z: _tensor_pb2.Tensor
    z_uncond: _tensor_pb2.Tensor
    temperature: float
    cfg: float
    num_steps: int
    seed: int
    noise: _tensor_pb2.Tensor
    trajectory: bool
    request_id: str
    def __init__(self, model: _Optional[str] = ..., z: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., z_uncond: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., temperature: _Optional[float] = ..., cfg: _Optional[float] = ..., num_steps: _Optional[int] = ..., seed: _Optional[int] = ..., noise: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., trajectory: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("tokens", "states", "log_density")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    LOG_DENSITY_FIELD_NUMBER: _ClassVar[int]
    tokens: _tensor_pb2.Tensor
    states: _tensor_pb2.Tensor
    log_density: _tensor_pb2.Tensor
    def __init__(self, tokens: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., states: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., log_density: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class LogDensityRequest(_message.Message):
    __slots__ = ("model", "z", "states", "temperature", "z_uncond", "cfg", "draft")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    Z_UNCOND_FIELD_NUMBER: _ClassVar[int]
    CFG_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    model: str
    z: _tensor_pb2.Tensor
    states: _tensor_pb2.Tensor
    temperature: float
    z_uncond: _tensor_pb2.Tensor
    cfg: float
    draft: bool
    def __init__(self, model: _Optional[str] = ..., z: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., states: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., temperature: _Optional[float] = ..., z_uncond: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., cfg: _Optional[float] = ..., draft: _Optional[bool] = ...) -> None: ...

class LogDensityResponse(_message.Message):
    __slots__ = ("log_density",)
    LOG_DENSITY_FIELD_NUMBER: _ClassVar[int]
    log_density: _tensor_pb2.Tensor
    def __init__(self, log_density: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class Drafts(_message.Message):
    __slots__ = ("states", "log_q", "z", "z_uncond", "draft_z", "draft_z_uncond", "usable", "seed")
    STATES_FIELD_NUMBER: _ClassVar[int]
    LOG_Q_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    Z_UNCOND_FIELD_NUMBER: _ClassVar[int]
    DRAFT_Z_FIELD_NUMBER: _ClassVar[int]
    DRAFT_Z_UNCOND_FIELD_NUMBER: _ClassVar[int]
    USABLE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    states: _tensor_pb2.Tensor
    log_q: _tensor_pb2.Tensor
    z: _tensor_pb2.Tensor
    z_uncond: _tensor_pb2.Tensor
    draft_z: _tensor_pb2.Tensor
    draft_z_uncond: _tensor_pb2.Tensor
    usable: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    def __init__(self, states: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., log_q: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., z: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., z_uncond: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., draft_z: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., draft_z_uncond: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., usable: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ...) -> None: ...

class VerifyDraftsRequest(_message.Message):
    __slots__ = ("model", "num_steps", "temperature", "cfg", "residual_rows", "drafts")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    CFG_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_ROWS_FIELD_NUMBER: _ClassVar[int]
    DRAFTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    num_steps: int
    temperature: float
    cfg: float
    residual_rows: int
    drafts: _containers.RepeatedCompositeFieldContainer[Drafts]
    def __init__(self, model: _Optional[str] = ..., num_steps: _Optional[int] = ..., temperature: _Optional[float] = ..., cfg: _Optional[float] = ..., residual_rows: _Optional[int] = ..., drafts: _Optional[_Iterable[_Union[Drafts, _Mapping]]] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("accepted", "recovered", "residual_proposals", "residual_capped")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    RECOVERED_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_PROPOSALS_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_CAPPED_FIELD_NUMBER: _ClassVar[int]
    accepted: _containers.RepeatedScalarFieldContainer[int]
    recovered: _tensor_pb2.Tensor
    residual_proposals: int
    residual_capped: int
    def __init__(self, accepted: _Optional[_Iterable[int]] = ..., recovered: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., residual_proposals: _Optional[int] = ..., residual_capped: _Optional[int] = ...) -> None: ...

class VerifyDraftsResponse(_message.Message):
    __slots__ = ("verdicts",)
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    verdicts: _containers.RepeatedCompositeFieldContainer[Verdict]
    def __init__(self, verdicts: _Optional[_Iterable[_Union[Verdict, _Mapping]]] = ...) -> None: ...
