"""arserve's client SDK: light (grpcio + protobuf), sync and asyncio."""

from .client import AsyncClient, Client
from .errors import (ArserveError, Cancelled, DeadlineExceeded, InvalidArgument, NotFound,
                     ResourceExhausted, Unauthenticated, Unavailable)
from .types import Chunk, Completion, Image, ImageResult, Logprob, Stats, build_image_request, build_request

__all__ = [
    "AsyncClient", "ArserveError", "Cancelled", "Chunk", "Client", "Completion", "DeadlineExceeded",
    "InvalidArgument", "Logprob", "NotFound", "ResourceExhausted", "Stats", "Unauthenticated", "Unavailable",
    "build_image_request", "build_request", "Image", "ImageResult",
]
