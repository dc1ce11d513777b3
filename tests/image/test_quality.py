"""The digits quality metric (classifier rate, Fréchet distance), the fixed
split, and the PNG helpers. The judge is fitted once (cached) for the file."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from arserve.image.grid import grid_png_bytes, png_bytes, save_grid
from arserve.image.quality import judge, split
from arserve.tokenizer.image import load_digits_images


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits_images()  # [1797, 1, 8, 8], [1797]
    _, test = split(len(labels))
    return images[test], labels[test]  # [359, 1, 8, 8], [359]


def test_split_is_fixed_disjoint_and_complete():
    train, test = split(1797)
    again_train, again_test = split(1797)
    assert torch.equal(train, again_train) and torch.equal(test, again_test)
    assert len(test) == 359 and len(train) == 1797 - 359
    assert not set(train.tolist()) & set(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(1797))
    assert not torch.equal(split(1797, seed=1)[1], test)


def test_reference_is_the_real_test_split(digits):
    ref = judge().reference()
    assert ref["n_test"] == 359
    assert ref["recognized_rate"] >= 0.95
    images, labels = digits
    assert judge().recognized_rate(images, labels) == ref["recognized_rate"]
    assert judge().frechet_distance(images) == pytest.approx(ref["frechet_distance"])


def test_frechet_ranks_real_below_noise_and_collapse(digits):
    images, labels = digits
    j = judge()
    real = j.frechet_distance(images)
    noise = j.frechet_distance(torch.rand(359, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    collapsed = j.frechet_distance(images[:1].expand(359, 1, 8, 8))  # one digit repeated
    one_class = j.frechet_distance(images[labels == 3])
    assert real < noise / 10
    assert real < collapsed / 10
    assert real < one_class / 5
    # numpy input gives the same number as torch input
    assert j.frechet_distance(images.numpy()) == pytest.approx(real)


def test_shuffled_labels_are_not_recognized(digits):
    images, labels = digits
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert judge().recognized_rate(images, shuffled) < 0.3
    assert judge().recognized_rate(images.numpy(), labels.numpy()) >= 0.95


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.zeros(4, 8, 8), r"\[n, 1, 8, 8\]"),
        (torch.zeros(4, 1, 28, 28), r"\[n, 1, 8, 8\]"),
        (torch.zeros(4, 3, 8, 8), r"\[n, 1, 8, 8\]"),
        (torch.zeros(0, 1, 8, 8), "empty"),
        (torch.full((4, 1, 8, 8), 16.0), r"\[0, 1\]"),
        (torch.full((4, 1, 8, 8), float("nan")), "NaN"),
    ],
)
def test_bad_images_raise(images, match):
    with pytest.raises(ValueError, match=match):
        judge().frechet_distance(images)
    with pytest.raises(ValueError, match=match):
        judge().recognized_rate(images, torch.zeros(len(images), dtype=torch.long))


def test_bad_labels_and_too_few_images_raise(digits):
    images, labels = digits
    with pytest.raises(ValueError, match=r"labels must have shape \[10\]"):
        judge().recognized_rate(images[:10], labels[:9])
    with pytest.raises(ValueError, match=r"labels must have shape \[10\]"):
        judge().recognized_rate(images[:10], labels[:10, None])
    with pytest.raises(ValueError, match="integers"):
        judge().recognized_rate(images[:10], labels[:10].float())
    with pytest.raises(ValueError, match="at least 2 images"):
        judge().frechet_distance(images[:1])


def test_png_bytes_round_trip(digits):
    image = digits[0][5]  # [1, 8, 8]
    for arg in (image, image[0], image.numpy()):
        decoded = Image.open(io.BytesIO(png_bytes(arg)))
        assert decoded.mode == "L" and decoded.size == (8, 8)
        pixels = np.asarray(decoded, dtype=np.float64) / 255  # [8, 8]
        assert np.abs(pixels - image[0].numpy()).max() <= 1 / 255
    with pytest.raises(ValueError, match=r"\[1, h, w\] or \[h, w\]"):
        png_bytes(torch.zeros(3, 8, 8))


def test_grid_layout(digits, tmp_path):
    images = digits[0][:10]  # [10, 1, 8, 8]
    scale, cell = 4, 8 * 4 + 1  # 1-pixel gaps between and around cells
    path = save_grid(images, tmp_path / "sub" / "grid.png", columns=4, scale=scale)
    grid = np.asarray(Image.open(path), dtype=np.float64) / 255  # [3 * cell + 1, 4 * cell + 1]
    assert grid.shape == (3 * cell + 1, 4 * cell + 1)
    for i in (0, 5, 9):
        r, c = divmod(i, 4)
        block = grid[1 + r * cell : (r + 1) * cell, 1 + c * cell : (c + 1) * cell]  # [32, 32]
        assert np.abs(block[::scale, ::scale] - images[i, 0].numpy()).max() <= 1 / 255
        assert np.ptp(block.reshape(8, scale, 8, scale), axis=(1, 3)).max() == 0  # nearest-neighbour
    assert Image.open(io.BytesIO(grid_png_bytes(images))).size == (4 * 65 + 1, 3 * 65 + 1)  # ceil(sqrt(10)) columns
