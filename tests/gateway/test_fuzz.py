"""Hostile input, generated (hypothesis): whatever arrives, the server
answers every public RPC with a result or a gRPC status that names the
problem, and keeps serving. Runs against the session's embedded server."""

from __future__ import annotations


import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from arserve_client.v1 import generation_pb2 as pb
from arserve_client.v1 import generation_pb2_grpc

# What bad input may get: a status that names the problem, never UNKNOWN or INTERNAL.
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}
EXAMPLES = settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# Mostly plausible values (so that many requests run), with hostile ones mixed in.
floats = st.one_of(st.none(), st.none(), st.sampled_from([0.0, 0.5, 0.9, 1.0]),
                   st.floats(allow_nan=True, allow_infinity=True))
u32 = st.one_of(st.integers(0, 16), st.integers(0, 16), st.integers(0, 2**32 - 1))


@st.composite
def requests(draw) -> pb.GenerateRequest:
    req = pb.GenerateRequest(model=draw(st.sampled_from(["", "", "", "smollm2-135m-instruct", "nope", "\x00" * 3])),
                             request_id=draw(st.text(max_size=40)))
    if draw(st.booleans()):
        req.prompt = draw(st.text(max_size=60))
    for _ in range(draw(st.sampled_from([0, 0, 1, 3]))):
        req.messages.add(role=draw(st.sampled_from(["user", "assistant", "system", "", "root", "tool"])),
                         content=draw(st.text(max_size=40)))
    s = req.sampling
    s.max_tokens = draw(st.sampled_from([1, 1, 2, 2, 0, 8193, 2**32 - 1]))  # never the 256-token default
    for field in ("temperature", "top_p"):
        value = draw(floats)
        if value is not None:
            setattr(s, field, value)
    if draw(st.booleans()):
        s.top_k = draw(u32)
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2**64 - 1))
    s.stop.extend(draw(st.one_of(st.just([]), st.lists(st.text(max_size=90), max_size=20))))
    sp = req.speculative
    sp.method = draw(st.sampled_from(["", "", "none", "ngram", "ngram", "draft_model", "heads", "medusa", "x" * 300]))
    if draw(st.booleans()):
        sp.num_draft_tokens = draw(u32)
    if draw(st.booleans()):
        sp.num_candidates = draw(u32)
    if draw(st.booleans()):
        sp.adaptive = draw(st.booleans())
    return req


@st.composite
def image_requests(draw) -> pb.GenerateImageRequest:
    req = pb.GenerateImageRequest(model=draw(st.sampled_from(["", "", "digits-mar", "smollm2-135m-instruct", "nope"])),
                                  request_id=draw(st.text(max_size=40)), return_tokens=draw(st.booleans()))
    req.labels.extend(draw(st.one_of(st.lists(st.integers(0, 12), max_size=3), st.lists(u32, max_size=3),
                                     st.lists(st.integers(0, 9), min_size=60, max_size=70))))
    req.num_steps = draw(st.sampled_from([1, 2, 2, 0, 1001, 2**32 - 1]))  # never the 50-step default
    for field in ("temperature", "cfg_scale"):
        value = draw(st.one_of(st.none(), st.sampled_from([1.0, 1.5, 1e-4, 11.0, -1.0]),
                               st.floats(allow_nan=True, allow_infinity=True)))
        if value is not None:
            setattr(req, field, value)
    if draw(st.booleans()):
        req.seed = draw(st.integers(0, 2**64 - 1))
    sp = req.speculative
    sp.method = draw(st.sampled_from(["", "none", "draft_model", "draft_model", "ngram", "x" * 300]))
    for field in ("num_draft_tokens", "num_candidates"):
        if draw(st.booleans()):
            setattr(sp, field, draw(u32))
    if draw(st.booleans()):
        sp.adaptive = draw(st.booleans())
    return req


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield generation_pb2_grpc.GenerationStub(channel), channel


def check(call, req, answered=None) -> None:
    """A status in ALLOWED with a message, or an answer that ``answered(out)``
    accepts (default: no more tokens than asked for)."""
    try:
        out = call()
    except grpc.RpcError as e:
        assert e.code() in ALLOWED, f"{e.code()}: {e.details()} for {req}"
        assert e.details(), f"{e.code()} without a message for {req}"
        event(e.code().name)
        return
    event("OK")
    if answered is not None:
        answered(out)
    elif hasattr(out, "usage"):
        assert out.usage.completion_tokens <= req.sampling.max_tokens


@EXAMPLES
@given(req=requests())
def test_generate_answers_or_names_the_problem(stub, req):
    s, _ = stub
    check(lambda: s.Generate(req, timeout=60), req)


@EXAMPLES
@given(req=requests())
def test_generate_stream_answers_or_names_the_problem(stub, req):
    s, _ = stub

    def run():
        chunks = list(s.GenerateStream(req, timeout=60))
        assert chunks and chunks[-1].finish_reason
        return chunks[-1]

    check(run, req)


@EXAMPLES
@given(req=image_requests())
def test_generate_image_answers_or_names_the_problem(stub, req):
    s, _ = stub

    def answered(out: pb.GenerateImageResponse) -> None:
        assert len(out.images) == len(req.labels) and all(im.png for im in out.images)

    check(lambda: s.GenerateImage(req, timeout=60), req, answered)


@EXAMPLES
@given(data=st.binary(max_size=300),
       method=st.sampled_from(["Generate", "GenerateStream", "ListModels", "GenerateImage"]))
def test_raw_bytes_on_the_wire_get_a_status(stub, data, method):
    """Bytes that may not parse (invalid UTF-8 in strings, truncated fields):
    a status with a message, or an answer when they happen to parse."""
    _, channel = stub
    path = f"/arserve.v1.Generation/{method}"
    kind = channel.unary_stream if method == "GenerateStream" else channel.unary_unary
    call = kind(path, request_serializer=None, response_deserializer=None)
    try:
        out = call(data, timeout=60)
        if method == "GenerateStream":
            list(out)
    except grpc.RpcError as e:
        assert e.code() in ALLOWED, (e.code(), e.details())
        assert e.details()


def test_invalid_utf8_in_a_string_field_is_refused(stub):
    _, channel = stub
    bad = b"\x1a\x04\xff\xfe\xfd\xfc"  # field 3 (prompt), 4 bytes that are not UTF-8
    call = channel.unary_unary("/arserve.v1.Generation/Generate", request_serializer=None,
                               response_deserializer=None)
    with pytest.raises(grpc.RpcError) as e:
        call(bad, timeout=10)
    assert e.value.details()
    s, _ = stub  # and the server still serves
    assert s.Generate(pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingParams(max_tokens=1)),
                      timeout=60).usage.completion_tokens == 1


