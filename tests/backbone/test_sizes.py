"""The backbone checks a Score call's lengths against the model's context
window before it allocates anything: internal callers are authenticated,
but a bug or a compromised caller must not make it build a [n, n] tree mask
or a KV cache of the caller's choosing."""

import asyncio

import pytest

import arserve.backbone.service as service
from arserve.backbone.service import BackboneService
from arserve.errors import InvalidArgument
from arserve.pb.v1 import backbone_pb2 as pb
from conftest import tiny_target

HUGE = 1 << 20  # a [HUGE, HUGE] bool mask would be 1 TiB


@pytest.fixture()
def backbone():
    return BackboneService({"tiny": tiny_target()})


@pytest.fixture()
def no_tree_masks(monkeypatch):
    built = []
    real = service.tree_inputs
    monkeypatch.setattr(service, "tree_inputs", lambda parents: built.append(len(parents)) or real(parents))
    return built


@pytest.mark.parametrize("request_fields", [
    dict(token_ids=[1] * HUGE, parents=[-1] + list(range(HUGE - 1))),  # a chain as long as a tree can be
    dict(token_ids=[1] * HUGE),
    dict(token_ids=[1], parents=[-1] * HUGE),  # parents longer than token_ids
    dict(token_ids=[1], start=HUGE, context=[1] * HUGE),  # a resume with a context past the window
    dict(token_ids=[1] * 10, start=510),  # 510 + 10 > 512 positions
])
def test_oversized_score_calls_are_refused_before_anything_is_allocated(backbone, no_tree_masks, request_fields):
    window = backbone.models["tiny"].config.max_seq_len
    with pytest.raises(InvalidArgument, match=f"context window exceeded.*> {window} positions|one entry per token_id"):
        asyncio.run(backbone.Score(pb.ScoreRequest(model="tiny", request_id="r", **request_fields)))
    assert no_tree_masks == []  # no [n, n] mask
    assert backbone.requests == {}  # no KV cache for the request


def test_a_tree_within_the_window_is_still_scored(backbone, no_tree_masks):
    out = asyncio.run(backbone.Score(pb.ScoreRequest(model="tiny", request_id="r", token_ids=[1, 2, 3],
                                                     parents=[-1, 0, 0], argmax_only=True)))
    assert len(out.argmax) == 3 and no_tree_masks == [3]
