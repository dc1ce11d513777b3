"""Sync and asyncio clients of ``arserve.v1.Generation``."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import AsyncIterator, Iterator

import grpc

from .errors import InvalidArgument, Unavailable, code_of, from_rpc_error
from .types import Chunk, Completion, ImageResult, build_image_request, build_request
from .v1 import generation_pb2 as pb
from .v1 import generation_pb2_grpc

MAX_MESSAGE_BYTES = 64 << 20
_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


def _channel_args(token: str | None, tls: bool, root_certificates: bytes | str | None,
                  metadata: list[tuple[str, str]] | None) -> tuple[grpc.ChannelCredentials | None, list]:
    """Credentials (None: plaintext) and per-call metadata (the bearer token rides there)."""
    metadata = list(metadata or [])
    if token:
        token = token.strip()  # as read from a file or a variable, with its newline
        bad = next((i for i, ch in enumerate(token) if not " " < ch <= "~"), None)
        if bad is not None:
            raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"token: a bearer token is printable ASCII "
                                                                    f"without spaces, got {token[bad]!r} at {bad}")
        metadata.append(("authorization", f"Bearer {token}"))
    if isinstance(root_certificates, str):
        with open(root_certificates, "rb") as f:
            root_certificates = f.read()
    if root_certificates is not None and b"-----BEGIN CERTIFICATE-----" not in root_certificates:
        raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, "root_certificates: not a PEM certificate (no "
                                                                "'-----BEGIN CERTIFICATE-----' block)")
    creds = grpc.ssl_channel_credentials(root_certificates) if tls or root_certificates else None
    return creds, metadata


def replayable(req: pb.GenerateRequest) -> bool:
    """Whether sending the request again gives the same answer: greedy (an
    unset temperature is greedy) or seeded. Only such requests are retried."""
    s = req.sampling
    return not s.HasField("temperature") or s.temperature == 0 or s.HasField("seed")


RETRY_CODES = (grpc.StatusCode.UNAVAILABLE,)  # the server was not reached or went away


def unfinished(what: str) -> Unavailable:
    """A response or stream that ends without a finish reason is no
    completion, though the call itself succeeded: something between the
    client and the decode loop cut it short (arserve's gateway reports that
    as an error status itself)."""
    return Unavailable(grpc.StatusCode.UNAVAILABLE, f"{what} ended without a finish reason: the completion is "
                                                    f"incomplete")


DRAIN_S = 2.0  # how long a stream's end is awaited after its finish chunk


def _drain(call) -> None:
    """Wait, ``DRAIN_S`` at most, for a stream's end after its finish chunk
    (the server closes it with OK once it has released the request).
    Cancelling it at once raced that end: Ray Serve's gRPC proxy logged
    every such stream as a failed request, with a traceback. What comes
    after the finish chunk, an error included, changes nothing the caller
    gets; a stream still open after ``DRAIN_S`` is cancelled."""
    ended = threading.Event()
    call.add_done_callback(lambda _: ended.set())
    ended.wait(DRAIN_S)


async def _drain_async(call) -> None:
    """``_drain`` for a grpc.aio call."""
    try:
        await asyncio.wait_for(call.code(), DRAIN_S)
    except (asyncio.TimeoutError, grpc.RpcError):
        pass


def completed(r: pb.GenerateResponse) -> Completion:
    if r.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
        raise unfinished("the response")
    return Completion.from_proto(r)


class Client:
    """Blocking client::

        client = Client("localhost:50051")
        print(client.generate(messages=[{"role": "user", "content": "Hi"}]).text)
        for chunk in client.stream(prompt="Once upon a time", max_tokens=32):
            print(chunk.text, end="")

    Options of ``generate``/``stream`` are those of ``build_request``;
    ``timeout`` is a per-call deadline in seconds; ``token`` a bearer token
    for a server that requires one; ``tls`` (or ``root_certificates``, PEM
    bytes or a file path, for a private CA or a self-signed server) connects
    over TLS. ``retries``: a greedy or seeded ``generate`` that finds the
    server UNAVAILABLE is sent again (exponential backoff from 0.2 s, within
    ``timeout``), since it gives the same answer; sampled ones are not.
    Failures raise ``ArserveError`` subclasses carrying the gRPC status.
    """

    def __init__(self, target: str = "localhost:50051", timeout: float | None = None,
                 metadata: list[tuple[str, str]] | None = None, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | None = None, retries: int = 3):
        creds, self.metadata = _channel_args(token, tls, root_certificates, metadata)
        self.tls, self.target = creds is not None, target
        self.channel = (grpc.secure_channel(target, creds, options=_OPTIONS) if creds
                        else grpc.insecure_channel(target, options=_OPTIONS))
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.timeout = timeout
        self.retries = retries

    def generate(self, prompt: str | None = None, messages=None, **options) -> Completion:
        req = build_request(prompt, messages, **options)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        attempt = 0
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return completed(self.stub.Generate(req, timeout=left, metadata=self.metadata))
            except grpc.RpcError as e:
                pause = 0.2 * 2 ** attempt
                if (code_of(e) not in RETRY_CODES or attempt >= self.retries or not replayable(req)
                        or (deadline is not None and time.monotonic() + pause >= deadline)):
                    raise from_rpc_error(e, self.tls, self.target) from None
            time.sleep(pause)
            attempt += 1

    def stream(self, prompt: str | None = None, messages=None, **options) -> Iterator[Chunk]:
        call = self.stub.GenerateStream(build_request(prompt, messages, **options), timeout=self.timeout,
                                        metadata=self.metadata)
        try:
            for chunk in call:
                if chunk.finish_reason:
                    _drain(call)  # before the last chunk: a reader that stops at it leaves no call to cancel
                    yield Chunk.from_proto(chunk)
                    return
                yield Chunk.from_proto(chunk)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.tls, self.target) from None
        finally:
            call.cancel()
        raise unfinished("the stream")

    def generate_image(self, labels, **options) -> ImageResult:
        """Images of the given class labels (one each); options of ``build_image_request``."""
        try:
            return ImageResult.from_proto(self.stub.GenerateImage(
                build_image_request(labels, **options), timeout=self.timeout, metadata=self.metadata))
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.tls, self.target) from None

    def models(self) -> list[pb.ModelInfo]:
        try:
            return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout,
                                             metadata=self.metadata).models)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.tls, self.target) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """asyncio client with the same methods as ``Client`` (``await generate``,
    ``async for chunk in stream(...)``)."""

    def __init__(self, target: str = "localhost:50051", timeout: float | None = None,
                 metadata: list[tuple[str, str]] | None = None, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | None = None):
        creds, self.metadata = _channel_args(token, tls, root_certificates, metadata)
        self.tls, self.target = creds is not None, target
        self.channel = (grpc.aio.secure_channel(target, creds, options=_OPTIONS) if creds
                        else grpc.aio.insecure_channel(target, options=_OPTIONS))
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.timeout = timeout

    async def generate(self, prompt: str | None = None, messages=None, **options) -> Completion:
        try:
            return completed(await self.stub.Generate(
                build_request(prompt, messages, **options), timeout=self.timeout, metadata=self.metadata))
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.tls, self.target) from None

    async def stream(self, prompt: str | None = None, messages=None, **options) -> AsyncIterator[Chunk]:
        call = self.stub.GenerateStream(build_request(prompt, messages, **options), timeout=self.timeout,
                                        metadata=self.metadata)
        try:
            async for chunk in call:
                if chunk.finish_reason:
                    await _drain_async(call)  # as in Client.stream
                    yield Chunk.from_proto(chunk)
                    return
                yield Chunk.from_proto(chunk)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.tls, self.target) from None
        finally:
            call.cancel()
        raise unfinished("the stream")

    async def generate_image(self, labels, **options) -> ImageResult:
        try:
            return ImageResult.from_proto(await self.stub.GenerateImage(
                build_image_request(labels, **options), timeout=self.timeout, metadata=self.metadata))
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.tls, self.target) from None

    async def models(self) -> list[pb.ModelInfo]:
        try:
            return list((await self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout,
                                                    metadata=self.metadata)).models)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.tls, self.target) from None

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
