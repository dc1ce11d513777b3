from arserve_client.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
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
