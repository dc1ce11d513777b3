"""The image path of the tokenizer: images <-> continuous patch tokens.

An image [channels, height, width] with pixels in [0, 1] is cut into
``patch x patch`` squares in raster order; each square's pixels, scaled to
[-1, 1], are one token of ``channels * patch * patch`` values. The digits
model: 8x8 one-channel images, 2x2 patches, 16 tokens of 4 values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Patchifier:
    channels: int = 1
    height: int = 8
    width: int = 8
    patch: int = 2

    @property
    def num_tokens(self) -> int:
        return (self.height // self.patch) * (self.width // self.patch)

    @property
    def token_dim(self) -> int:
        return self.channels * self.patch * self.patch

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[n, channels, height, width] in [0, 1] -> [n, num_tokens, token_dim] in [-1, 1]."""
        n, c, h, w = images.shape
        if (c, h, w) != (self.channels, self.height, self.width):
            raise ValueError(f"image shape {[c, h, w]} is not {[self.channels, self.height, self.width]}")
        p = self.patch
        x = images.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, self.num_tokens, self.token_dim) * 2 - 1

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[n, num_tokens, token_dim] -> [n, channels, height, width] clipped to [0, 1]."""
        n = tokens.shape[0]
        if tuple(tokens.shape[1:]) != (self.num_tokens, self.token_dim):
            raise ValueError(f"tokens shape {list(tokens.shape[1:])} is not {[self.num_tokens, self.token_dim]}")
        p, c, h, w = self.patch, self.channels, self.height, self.width
        x = tokens.reshape(n, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
        return ((x + 1) / 2).clamp(0, 1)


DIGITS = Patchifier()


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (offline): images [1797, 1, 8, 8] in
    [0, 1] (pixel values 0..16 scaled) and labels [1797] int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    return images, torch.tensor(d.target, dtype=torch.long)
