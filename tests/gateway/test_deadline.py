"""The gateway bounds every request by its deadline (the client's timeout
or max_request_s), in every wiring: a verifier or tokenizer that never
answers fails the request with DEADLINE_EXCEEDED instead of holding it (and
its admission slot) forever. Unit level: the services behind the gateway
are stand-ins that hang; the distributed version is in tests/rayserve."""

import asyncio

import pytest

from arserve import deadlines
from arserve.errors import DeadlineExceeded
from arserve.gateway.service import GenerationService
from arserve.pb.v1 import tokenizer_pb2 as tpb
from arserve.settings import ServerSettings
from arserve_client.v1 import generation_pb2 as pb


class Tokenizer:
    def __init__(self, hang: bool = False):
        self.hang = hang

    async def Encode(self, req):
        if self.hang:
            await asyncio.Event().wait()
        return tpb.EncodeResponse(token_ids=[1, 2, 3])


class WedgedVerifier:
    """Takes the request and never yields an event; notes the time left it saw."""

    def __init__(self):
        self.left = []

    async def Run(self, req):
        self.left.append(deadlines.left())
        await asyncio.Event().wait()
        yield  # pragma: no cover


def gateway(tokenizer, verifier, max_request_s: float) -> GenerationService:
    settings = ServerSettings(max_request_s=max_request_s)
    return GenerationService(settings, tokenizer, verifier, windows={settings.models[0].id: 8192})


async def generate(service: GenerationService):
    # 30 s: a guard for the old behaviour (hang), far above the deadline under test
    return await asyncio.wait_for(service.Generate(pb.GenerateRequest(prompt="Hi")), 30)


@pytest.mark.parametrize("where", ["verifier", "tokenizer"])
def test_a_request_past_max_request_s_is_deadline_exceeded(where):
    verifier = WedgedVerifier()
    service = gateway(Tokenizer(hang=where == "tokenizer"), verifier, max_request_s=0.5)
    with pytest.raises(DeadlineExceeded, match=f"deadline passed while waiting for the {where}"):
        asyncio.run(generate(service))
    assert service.active == 0  # the admission slot is free again
    if where == "verifier":
        assert len(verifier.left) == 1 and 0 < verifier.left[0] <= 0.5  # what internal calls carry on


def test_a_passed_deadline_is_logged_as_the_callers_and_a_server_fault_as_a_warning(caplog):
    """A soak probe counted 169 WARNING lines in 25 minutes, one per client
    deadline: the caller's doing, so an INFO line; a fault of the server
    keeps its WARNING."""
    class Broken:
        async def Run(self, req):
            raise RuntimeError("the decode loop broke")
            yield  # pragma: no cover

    with caplog.at_level("INFO", logger="arserve.gateway"):
        with pytest.raises(DeadlineExceeded):
            asyncio.run(generate(gateway(Tokenizer(), WedgedVerifier(), max_request_s=0.3)))
        with pytest.raises(RuntimeError):
            asyncio.run(generate(gateway(Tokenizer(), Broken(), max_request_s=30)))
    failed = {r.getMessage().split(": ", 2)[1]: r.levelname for r in caplog.records if "failed: " in r.getMessage()}
    assert failed == {"DeadlineExceeded": "INFO", "RuntimeError": "WARNING"}, failed


def test_the_clients_deadline_wins_when_it_is_sooner():
    verifier = WedgedVerifier()
    service = gateway(Tokenizer(), verifier, max_request_s=600)

    async def as_a_server_would():
        deadlines.begin(600, client_left_s=0.3)  # what the gRPC interceptor does with the client's timeout
        return await generate(service)

    with pytest.raises(DeadlineExceeded):
        asyncio.run(as_a_server_would())
    assert verifier.left[0] <= 0.3


def test_a_cancellation_that_meets_a_finished_step_is_not_swallowed():
    """The request is cancelled (a client's timeout, a disconnect) in the
    same turn of the loop as the step it waits on completes. The
    cancellation must still reach the request: Python 3.11's
    ``asyncio.wait_for`` returned the step's result instead and dropped it
    (CPython gh-86296), so a request whose client had given up ran on to
    its last token (the HTTP door's 504 test saw a 200 on a fast machine)."""

    async def main() -> None:
        deadlines.begin(None, 30.0)
        step = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(deadlines.within(step, "a step"))
        await asyncio.sleep(0)  # the task now waits on the step
        step.set_result("done")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_a_status_the_ended_call_cannot_take_is_not_a_server_fault(caplog):
    """A soak probe: where gRPC's deadline timer ended a call just as the
    handler failed with DEADLINE_EXCEEDED, ``abort`` itself failed
    (ExecuteBatchError) and gRPC logged an ERROR with two tracebacks. The
    interceptor now ends such a call as cancelled, which gRPC notes at DEBUG."""
    from types import SimpleNamespace

    import grpc
    from grpc._cython import cygrpc

    from arserve.rpc import ServiceInterceptor

    async def handler(request, context):
        raise DeadlineExceeded("the request's deadline passed while its images were decoded")

    class Ended:  # the context of a call whose status gRPC has already sent
        def time_remaining(self):
            return -0.001

        async def abort(self, code, details):
            raise cygrpc.ExecuteBatchError("Failed \"execute_batch\"")

    async def call():
        details = SimpleNamespace(method="/arserve.v1.Generation/GenerateImage", invocation_metadata=())
        wrapped = await ServiceInterceptor().intercept_service(
            lambda d: asyncio.sleep(0, grpc.unary_unary_rpc_method_handler(handler)), details)
        await wrapped.unary_unary(b"", Ended())

    with caplog.at_level("DEBUG", logger="arserve.rpc"), pytest.raises(asyncio.CancelledError):
        asyncio.run(call())
    assert not [r for r in caplog.records if r.levelno >= 30]
    assert "DEADLINE_EXCEEDED not sent, the call had ended" in caplog.text
