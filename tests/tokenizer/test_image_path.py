"""The tokenizer's image path: images <-> continuous patch tokens, directly
and through the Patchify/Unpatchify RPCs, with shape errors named."""

import asyncio

import pytest
import torch

from arserve.errors import InvalidArgument, NotFound
from arserve.pb.v1 import tokenizer_pb2 as pb
from arserve.tokenizer.image import DIGITS, load_digits_images
from arserve.tokenizer.service import TokenizerService
from arserve.wire import from_proto, to_proto


def test_patches_are_raster_order_2x2_squares_and_round_trip():
    images, _ = load_digits_images()  # [1797, 1, 8, 8]
    tokens = DIGITS.patchify(images[:5])  # [5, 16, 4]
    assert tokens.shape == (5, 16, 4) and tokens.min() >= -1 and tokens.max() <= 1
    # token 5 is the square at patch row 1, column 1: pixels (2..3, 2..3)
    assert torch.equal(tokens[0, 5], images[0, 0, 2:4, 2:4].flatten() * 2 - 1)
    assert torch.allclose(DIGITS.unpatchify(tokens), images[:5])


def test_rpcs_take_one_image_or_a_batch_and_name_bad_shapes():
    service = TokenizerService({}, {"digits-mar": DIGITS})
    image = torch.rand(1, 8, 8)

    async def main():
        one = await service.Patchify(pb.PatchifyRequest(model="digits-mar", image=to_proto(image)))
        assert from_proto(one.tokens).shape == (16, 4)
        back = await service.Unpatchify(pb.UnpatchifyRequest(model="digits-mar", tokens=one.tokens))
        assert torch.allclose(from_proto(back.image), image)
        batch = await service.Unpatchify(pb.UnpatchifyRequest(model="digits-mar",
                                                              tokens=to_proto(torch.zeros(3, 16, 4))))
        assert from_proto(batch.image).shape == (3, 1, 8, 8)
        with pytest.raises(InvalidArgument, match=r"tokens: tokens shape \[15, 4\]"):
            await service.Unpatchify(pb.UnpatchifyRequest(model="digits-mar", tokens=to_proto(torch.zeros(15, 4))))
        with pytest.raises(InvalidArgument, match=r"image: image shape \[1, 9, 8\]"):
            await service.Patchify(pb.PatchifyRequest(model="digits-mar", image=to_proto(torch.zeros(1, 9, 8))))
        with pytest.raises(NotFound, match="no image tokenizer"):
            await service.Patchify(pb.PatchifyRequest(model="smollm2", image=to_proto(image)))

    asyncio.run(main())
