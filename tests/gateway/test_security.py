"""Who gets in and what they may send: bearer tokens, TLS, size limits, and
a cancelled stream leaves nothing behind. The servers here share the
session server's services (one copy of the model), each with its own
public settings."""

from __future__ import annotations

import asyncio
import datetime
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from arserve_client import (Client, DeadlineExceeded, InvalidArgument, ResourceExhausted, Unauthenticated,
                            Unavailable)
from arserve.gateway.images import ImageFront
from arserve.gateway.server import start_server
from arserve.gateway.service import GenerationService
from arserve.settings import ServerSettings


class public:
    """Another public server (its own settings) in front of the session
    server's tokenizer and verifier, on the session server's event loop
    (the services' asyncio state belongs to that loop)."""

    def __init__(self, server, delay_s: float = 0.0, verifier=None, image_verifier=None, **options):
        """verifier / image_verifier: in place of the session server's."""
        self.server, self.delay_s = server, delay_s
        self.settings = ServerSettings(**{"port": 0, "models": server.settings.models, **options})
        s = server.service
        images = s.images if image_verifier is None else ImageFront(self.settings, s.images.tokenizer, image_verifier,
                                                                     s.images.configs)
        self.service = GenerationService(self.settings, s.tokenizer, verifier or s.verifier, s.windows, images)
        self.grpc_server, self.port = None, self.settings.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.server._loop).result(timeout)

    async def _start(self):
        await asyncio.sleep(self.delay_s)
        self.grpc_server, self.port, _ = await start_server(self.service, self.settings)

    def start(self) -> "public":
        if self.delay_s:  # comes up later, while a client is already trying
            asyncio.run_coroutine_threadsafe(self._start(), self.server._loop)
        else:
            self._run(self._start())
        return self

    def stop(self) -> None:
        if self.grpc_server is not None:
            self._run(self.grpc_server.stop(grace=1))
            self.grpc_server = None

    def __enter__(self) -> "public":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def test_a_token_is_required_when_configured(server):
    with public(server, auth_token="s3cret-token") as srv:
        for client in (Client(srv.target), Client(srv.target, token="wrong")):
            with client, pytest.raises(Unauthenticated, match="bearer token"):
                client.generate(prompt="Hi", max_tokens=2)
            with Client(srv.target, token="wrong") as c, pytest.raises(Unauthenticated):
                list(c.stream(prompt="Hi", max_tokens=2))
            with Client(srv.target) as c, pytest.raises(Unauthenticated):
                c.models()
        with Client(srv.target, token="s3cret-token") as c:
            assert c.generate(prompt="Hi", max_tokens=2).stats.completion_tokens == 2
        with Client(srv.target, token="s3cret-token\n") as c:  # read from a file, newline and all
            assert c.generate(prompt="Hi", max_tokens=2).stats.completion_tokens == 2
        with pytest.raises(InvalidArgument, match=r"token: .* got '\\x01' at 2"):  # not "INTERNAL: Invalid metadata"
            Client(srv.target, token="s3\x01cret")
        with Client(srv.target, metadata=[("authorization", "bearer s3cret-token")]) as c:  # RFC 7235: any case
            assert c.generate(prompt="Hi", max_tokens=2).stats.completion_tokens == 2
        with grpc.insecure_channel(srv.target) as channel:  # health checks stay open for probes
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def self_signed(tmp_path) -> tuple:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_tls_with_the_sdk(server, tmp_path):
    cert, key = self_signed(tmp_path)
    with public(server, tls_cert_file=cert, tls_key_file=key, auth_token="t0ken") as srv:
        target = f"localhost:{srv.port}"
        with Client(target, root_certificates=str(cert), token="t0ken", timeout=120) as c:
            assert c.generate(prompt="Hi", max_tokens=3).stats.completion_tokens == 3
        with Client(target, timeout=5) as plain, pytest.raises(Unavailable, match="If it serves TLS, connect with tls=True"):
            plain.generate(prompt="Hi", max_tokens=1)
    with Client(server.target, root_certificates=str(cert), timeout=5) as tls, \
            pytest.raises(Unavailable, match="does the server serve TLS"):  # the other way round
        tls.generate(prompt="Hi", max_tokens=1)


def test_oversized_requests_are_refused(server):
    with public(server, max_prompt_bytes=10_000, max_message_bytes=1 << 20) as srv, Client(srv.target) as c:
        with pytest.raises(InvalidArgument, match="prompt is 20000 bytes"):
            c.generate(prompt="x" * 20_000, max_tokens=1)
        with pytest.raises(ResourceExhausted):
            c.generate(prompt="x" * (2 << 20), max_tokens=1)
        assert c.generate(prompt="Hi", max_tokens=1).stats.completion_tokens == 1


def test_a_cancelled_stream_frees_its_kv_cache_and_drafter_state(server, client):
    verifier = server.service.verifier
    backbone, drafter = verifier.backbone, verifier.drafter
    stream = client.stream(prompt="one two three four one two three four one two", max_tokens=200,
                           speculative="ngram")
    next(stream), next(stream)
    assert backbone.requests  # the request holds a KV cache
    stream.close()  # the client goes away mid-stream
    deadline = time.time() + 10
    while (backbone.requests or drafter.contexts) and time.time() < deadline:
        time.sleep(0.05)
    assert not backbone.requests and not drafter.contexts


def test_past_the_admission_limit_requests_are_refused_at_once(server):
    with public(server, max_active_requests=1) as srv, Client(srv.target, timeout=300) as c:
        running = c.stream(prompt="Count slowly from one to one hundred.", max_tokens=40)
        first = next(running)
        t = time.time()
        with pytest.raises(ResourceExhausted, match="max_active_requests"):
            c.generate(prompt="Hi", max_tokens=1)
        assert time.time() - t < 2  # refused, not queued
        rest = list(running)  # the admitted request finishes
        assert (rest[-1] if rest else first).stats.completion_tokens == 40
        assert c.generate(prompt="Hi", max_tokens=1).stats.completion_tokens == 1


def test_the_client_deadline_is_honoured_and_frees_the_request(server):
    backbone = server.service.verifier.backbone
    with Client(server.target, timeout=0.5) as c:
        t = time.time()
        with pytest.raises(DeadlineExceeded):
            c.generate(prompt="1, 2, 3, 4, 5, 6, 7,", max_tokens=500, speculative="none")
        assert time.time() - t < 5
    deadline = time.time() + 10
    while backbone.requests and time.time() < deadline:
        time.sleep(0.05)
    assert not backbone.requests


class Hung:
    """A drafter or diffusion head that never answers; notes whether the
    server gave up on it (its call was cancelled)."""

    def __init__(self):
        self.cancelled = asyncio.Event()

    async def _hang(self, *args, **kwargs):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    Propose = Sample = _hang

    async def Release(self, req):
        return None


def test_a_hung_drafter_or_diffusion_head_ends_at_the_clients_deadline(server, client):
    """The verifier would wait 60 s for the drafter, and the head never
    answers: the client's own deadline ends both calls with
    DEADLINE_EXCEEDED, the server cancels the work, frees the request and
    keeps serving."""
    from arserve.verifier.image import ImageVerifier
    from arserve.verifier.service import SpeculationDefaults, VerifierService

    s = server.service
    drafter, head = Hung(), Hung()
    verifier = VerifierService(s.verifier.backbone, drafter, s.verifier.eos_ids,
                               SpeculationDefaults(draft_timeout_s=60.0))
    loop = s.images.verifier
    images = ImageVerifier(loop.backbone, loop.drafter, head, loop.configs)
    # 2 s: room for the prefill (or the image prompt) to reach the hung call on a loaded host
    with public(server, verifier=verifier, image_verifier=images) as srv, Client(srv.target, timeout=2.0) as c:
        for call in (lambda: c.generate(prompt="1, 2, 3, 1, 2, 3,", max_tokens=64, speculative="ngram"),
                     lambda: c.generate_image(labels=[3], seed=0)):
            t = time.time()
            with pytest.raises(DeadlineExceeded):
                call()
            assert time.time() - t < 4
        for hung in (drafter, head):
            srv._run(asyncio.wait_for(hung.cancelled.wait(), 10))
        image_backbone = loop.backbone.service  # the image request's KV cache is freed too
        deadline = time.time() + 10
        while (s.verifier.backbone.requests or srv.service.active or image_backbone.sessions) \
                and time.time() < deadline:
            time.sleep(0.05)
        assert not s.verifier.backbone.requests and srv.service.active == 0 and not image_backbone.sessions
    assert client.generate(prompt="Hi", max_tokens=2).stats.completion_tokens == 2
    assert len(client.generate_image(labels=[3], seed=0).images) == 1


def test_the_sdk_retries_a_replayable_request_until_the_server_is_up(server):
    from arserve.rayserve.run import free_port

    port = free_port()
    srv = public(server, delay_s=0.5, port=port).start()  # comes up while the client retries
    try:
        with Client(f"127.0.0.1:{port}", timeout=60, retries=6) as c:
            assert c.generate(prompt="Hi", max_tokens=2).stats.completion_tokens == 2  # greedy: retried
        srv.stop()
        with Client(f"127.0.0.1:{port}", timeout=60, retries=6) as c:
            t = time.time()
            with pytest.raises(Unavailable):  # sampled without a seed: not replayed
                c.generate(prompt="Hi", max_tokens=2, temperature=0.8)
            assert time.time() - t < 1
    finally:
        srv.stop()
