"""The image drafter service on a tiny seeded draft: drafts follow the noise
the caller sends, its cache follows the commits each call names, a replica
without the request's cache says so, and bad input is refused by name."""

import asyncio

import pytest
import torch

from arserve.core.image_model import ImageAR, ImageConfig
from arserve.drafter.image import ImageDrafter
from arserve.errors import FailedPrecondition, InvalidArgument
from arserve.pb.v1 import drafter_pb2 as pb
from arserve.wire import from_proto, to_proto

CONFIG = ImageConfig.from_name("tiny").with_(seq_len=6, token_dim=2)
STEPS = 4


@pytest.fixture(scope="module")
def draft() -> ImageAR:
    torch.manual_seed(1)
    m = ImageAR(CONFIG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def propose(request_id, lengths, noise, pending=None, labels=(2, 7)) -> pb.ProposeRequest:
    image = pb.ImageDraftRequest(labels=list(labels), lengths=lengths, noise=to_proto(noise), temperature=1.0,
                                 cfg=1.0, num_steps=STEPS, capacity=CONFIG.seq_len + 3)
    if pending is not None:
        image.pending.CopyFrom(to_proto(pending))
    return pb.ProposeRequest(request_id=request_id, model="m", method="draft_model", image=image)


def test_drafts_follow_the_noise_and_the_cache_follows_commits(draft):
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(3, STEPS + 1, 2, CONFIG.token_dim, generator=g)

    async def main():
        service = ImageDrafter({"m": draft})
        a = (await service.Propose(propose("a", [0, 0], noise))).draft
        tokens = from_proto(a.tokens)  # [2, 3, token_dim]
        assert tokens.shape == (2, 3, CONFIG.token_dim) and from_proto(a.states).shape == (STEPS + 1, 2, 3, 2)
        assert from_proto(a.log_density).shape == (2, 3) and from_proto(a.z).shape == (2, 3, CONFIG.dim)
        # the same noise from the same committed state drafts the same tokens (a rollback to length 0)
        again = (await service.Propose(propose("a", [0, 0], noise))).draft
        assert torch.equal(from_proto(again.tokens), tokens)
        # commit the class and the first draft; the third draft, drafted from there with its own
        # noise, is the one the first round drafted, from the same condition z: the cache kept
        # what was committed
        second = (await service.Propose(propose("a", [2, 2], noise[2:3], pending=tokens[:, 1]))).draft
        assert torch.allclose(from_proto(second.z)[:, 0], from_proto(a.z)[:, 2], atol=1e-5)
        assert torch.allclose(from_proto(second.tokens)[:, 0], tokens[:, 2], atol=1e-5)
        with pytest.raises(FailedPrecondition, match="no draft cache"):
            await ImageDrafter({"m": draft}).Propose(propose("a", [1, 1], noise[:1], pending=tokens[:, 0]))
        with pytest.raises(InvalidArgument, match="may not pass the positions drafted"):
            await service.Propose(propose("a", [6, 6], noise[:1], pending=tokens[:, 0]))
        with pytest.raises(InvalidArgument, match=r"image.noise must be \[k <= 16, S \+ 1, 2, 2\]"):
            await service.Propose(propose("b", [0, 0], torch.zeros(1, STEPS + 1, 3, 2)))
        with pytest.raises(InvalidArgument, match="image.pending"):
            await service.Propose(propose("b", [0, 0], noise[:1], pending=tokens[:, 0]))
        await service.Release(pb.DrafterReleaseRequest(request_id="a", model="m"))
        assert not service.sessions

    asyncio.run(main())
