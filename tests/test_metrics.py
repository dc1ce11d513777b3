"""Prometheus metrics move with real requests and are served over HTTP."""

import socket
import urllib.request

from prometheus_client import REGISTRY

from arserve_client import InvalidArgument


def value(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_requests_tokens_and_speculation_are_counted(client):
    model = "smollm2-135m-instruct"
    before = {
        "length": value("arserve_requests_total", model=model, method="ngram", outcome="length"),
        "invalid": value("arserve_requests_total", model=model, method="none", outcome="invalid_argument"),
        "tokens": value("arserve_generated_tokens_total", model=model),
        "drafted": value("arserve_drafted_tokens_total", model=model, method="ngram"),
        "ttft": value("arserve_time_to_first_token_seconds_count", model=model),
    }
    out = client.generate(prompt="one two three one two three one two three one two", max_tokens=12,
                          speculative="ngram")
    try:
        client.generate(prompt="hi", top_p=2.0)
    except InvalidArgument:
        pass
    assert value("arserve_requests_total", model=model, method="ngram", outcome="length") == before["length"] + 1
    assert value("arserve_requests_total", model=model, method="none",
                 outcome="invalid_argument") == before["invalid"] + 1
    assert value("arserve_generated_tokens_total", model=model) == before["tokens"] + out.stats.completion_tokens
    assert value("arserve_drafted_tokens_total", model=model, method="ngram") == \
        before["drafted"] + out.stats.drafted_tokens
    assert value("arserve_time_to_first_token_seconds_count", model=model) == before["ttft"] + 1
    assert value("arserve_backbone_batch_requests_count", model=model) > 0


def test_metrics_endpoint():
    from arserve.metrics import serve_metrics

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve_metrics(port)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "arserve_requests_total" in body and "arserve_time_per_output_token_seconds" in body


def test_every_metric_is_exported_to_ray():
    """Ray replicas export ``metrics.ALL``: a Family left out of it (as the
    resume counter was) is invisible in the Ray wiring."""
    from arserve import metrics

    families = [v for v in vars(metrics).values() if isinstance(v, metrics.Family)]
    assert families and set(map(id, families)) == set(map(id, metrics.ALL)), \
        sorted(f.name for f in families if f not in metrics.ALL)


def test_tokens_sent_to_a_request_that_is_then_cancelled_are_counted(client, server):
    """The counter took a request's tokens when it finished, so none of a
    cancelled or timed-out request's were counted, though they were sent."""
    import time

    model = "smollm2-135m-instruct"
    before = value("arserve_generated_tokens_total", model=model)
    got = 0
    stream = client.stream(prompt="Count to a hundred: 1, 2,", max_tokens=200, speculative="none")
    for chunk in stream:
        got += len(chunk.token_ids)
        if got >= 5:
            break
    stream.close()
    deadline = time.time() + 30
    while server.service.active and time.time() < deadline:
        time.sleep(0.05)
    assert got <= value("arserve_generated_tokens_total", model=model) - before < 200
