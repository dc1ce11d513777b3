from arserve_client.v1 import generation_pb2 as _generation_pb2
from arserve_client.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeRequest(_message.Message):
    __slots__ = ("model", "prompt", "messages")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[_generation_pb2.ChatMessage]
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_generation_pb2.ChatMessage, _Mapping]]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("token_ids", "state")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    state: DetokenizerState
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., state: _Optional[_Union[DetokenizerState, _Mapping]] = ...) -> None: ...

class DetokenizerState(_message.Message):
    __slots__ = ("window", "read_offset")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    READ_OFFSET_FIELD_NUMBER: _ClassVar[int]
    window: _containers.RepeatedScalarFieldContainer[int]
    read_offset: int
    def __init__(self, window: _Optional[_Iterable[int]] = ..., read_offset: _Optional[int] = ...) -> None: ...

class DecodeIncrementalRequest(_message.Message):
    __slots__ = ("model", "state", "token_ids", "final")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    model: str
    state: DetokenizerState
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    final: bool
    def __init__(self, model: _Optional[str] = ..., state: _Optional[_Union[DetokenizerState, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., final: _Optional[bool] = ...) -> None: ...

class DecodeIncrementalResponse(_message.Message):
    __slots__ = ("text", "state")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    text: str
    state: DetokenizerState
    def __init__(self, text: _Optional[str] = ..., state: _Optional[_Union[DetokenizerState, _Mapping]] = ...) -> None: ...

class TokenBytesRequest(_message.Message):
    __slots__ = ("model", "token_ids")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenBytesResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, tokens: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PatchifyRequest(_message.Message):
    __slots__ = ("model", "image")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: _tensor_pb2.Tensor
    def __init__(self, model: _Optional[str] = ..., image: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class PatchifyResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _tensor_pb2.Tensor
    def __init__(self, tokens: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class UnpatchifyRequest(_message.Message):
    __slots__ = ("model", "tokens")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    tokens: _tensor_pb2.Tensor
    def __init__(self, model: _Optional[str] = ..., tokens: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class UnpatchifyResponse(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: _tensor_pb2.Tensor
    def __init__(self, image: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
