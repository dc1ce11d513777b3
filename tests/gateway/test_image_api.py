"""GenerateImage through real gRPC on the embedded server with the committed
digits checkpoints: recognizable digits, PNGs, reproducible seeds, both
methods, bad input that gets INVALID_ARGUMENT while the server keeps
serving, and checkpoints whose hash is checked."""

import io
import math
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from arserve.image.checkpoints import CHECKPOINT_DIR, HASHES, CheckpointError, load_checkpoint, load_file_checked
from arserve.image.quality import judge
from arserve_client import InvalidArgument, NotFound


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im.pixels, dtype=np.float32).reshape(im.channels, im.height, im.width)
                     for im in result.images])


def test_models_lists_the_image_model(client):
    image = [m for m in client.models() if m.kind == "image"]
    assert [m.id for m in image] == ["digits-mar"] and image[0].is_default and image[0].source == "digits"
    assert list(image[0].speculative_methods) == ["none", "draft_model"] and image[0].context_length == 16


def test_committed_target_draws_recognizable_digits(client):
    """At least 90% of 200 seeded samples are recognized as their requested class."""
    labels = [i % 10 for i in range(200)]
    images = np.concatenate([pixels(client.generate_image(labels[i:i + 50], seed=i)) for i in range(0, 200, 50)])
    rate = judge().recognized_rate(images, np.asarray(labels))
    assert rate >= 0.90, rate


def test_images_come_as_pngs_with_pixels_and_tokens(client):
    out = client.generate_image([3, 7], seed=5, return_tokens=True)
    assert [im.label for im in out.images] == [3, 7] and out.model == "digits-mar"
    for im in out.images:
        png = Image.open(io.BytesIO(im.png))
        assert png.size == (8, 8) and (im.height, im.width, im.channels) == (8, 8, 1)
        assert np.abs(np.asarray(png, dtype=np.float32) / 255 - np.asarray(im.pixels).reshape(8, 8)).max() <= 1 / 255
        assert len(im.tokens) == 16 * 4
    assert out.stats.completion_tokens == 32 and out.stats.method == "none"


@pytest.mark.parametrize("method", ["none", "draft_model"])
def test_seeded_requests_reproduce(client, method):
    fixed = dict(adaptive=False) if method == "draft_model" else {}  # k = 3 every round: drafts are verified
    a = client.generate_image([1, 4], seed=11, speculative=method, **fixed)
    b = client.generate_image([1, 4], seed=11, speculative=method, **fixed)
    c = client.generate_image([1, 4], seed=12, speculative=method, **fixed)
    assert [im.pixels for im in a.images] == [im.pixels for im in b.images]
    assert [im.pixels for im in a.images] != [im.pixels for im in c.images]
    if method == "draft_model":
        assert a.stats.method == "draft_model" and a.stats.drafted_tokens > 0 and a.stats.rounds > 0
        assert 1.0 <= a.stats.mean_accepted_length <= 5.0
        # the default, adaptive: at the digits draft's measured per-token acceptance (0.6) drafting does
        # not pay, so the request decodes plainly and drafts nothing (the cost model of docs/images.md)
        assert client.generate_image([1, 4], seed=11, speculative=method).stats.drafted_tokens == 0


@pytest.mark.parametrize("options,message", [
    (dict(labels=[10]), "labels[0] = 10"),
    (dict(labels=[]), "labels is empty"),
    (dict(labels=list(range(10)) * 7), "at most 64"),
    (dict(labels=[1], num_steps=0), "num_steps"),
    (dict(labels=[1], num_steps=1001), "num_steps"),
    (dict(labels=[1], cfg_scale=math.nan), "cfg_scale"),
    (dict(labels=[1], cfg_scale=0.5), "cfg_scale"),
    (dict(labels=[1], temperature=0.0), "temperature"),
    (dict(labels=[1], temperature=math.inf), "temperature"),
    (dict(labels=[1], temperature=1e-30), "temperature"),
    (dict(labels=[1], cfg_scale=1e30), "cfg_scale"),
    (dict(labels=[1], speculative="ngram"), "speculative.method"),
    (dict(labels=[1], speculative="draft_model", num_draft_tokens=17), "num_draft_tokens"),
])
def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(client, options, message):
    labels = options.pop("labels")
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        client.generate_image(labels, **options)
    assert len(client.generate_image([2], seed=0, num_steps=4).images) == 1


def test_concurrent_plain_requests_step_together_and_keep_their_images(server, client):
    """Plain requests that arrive together are stepped as one batch (one head
    call and one Backbone.ScoreMany a step), and each gets the images it gets
    alone, bit for bit: its noise comes from its own seed and every row is
    computed batch-invariantly. Requests of another kind (temperature,
    guidance) step in loops of their own."""
    cases = [([i % 10], dict(seed=100 + i)) for i in range(6)] + [
        ([2, 5], dict(seed=7)), ([3], dict(seed=8, temperature=0.8)), ([4], dict(seed=9, cfg_scale=2.0)),
        ([6], dict(seed=10, speculative="draft_model"))]  # adaptive from the digits draft's prior: plain
    alone = [pixels(client.generate_image(labels, **options)) for labels, options in cases]
    verifier = server.service.images.verifier
    verifier = getattr(verifier, "images", verifier)  # the image loop behind the verifier's servicer
    scores, heads = verifier.backbone.gather, verifier.heads.gather
    steps, stepped = verifier.plain.steps, verifier.plain.requests_stepped
    counts = (scores.runs, scores.items, heads.runs, heads.items)
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(lambda case: pixels(client.generate_image(case[0], **case[1])), cases))
    for a, b in zip(alone, together, strict=True):
        assert np.array_equal(a, b)
    assert verifier.plain.requests_stepped - stepped > verifier.plain.steps - steps  # steps carried several
    runs, items = scores.runs - counts[0], scores.items - counts[1]
    assert items > runs  # their Score calls travelled together (Backbone.ScoreMany)
    assert heads.items - counts[3] > heads.runs - counts[2]  # and their head samples


def test_concurrent_speculative_requests_start_rounds_together_and_keep_their_images(server, client):
    """Speculative requests of one kind start their rounds together (their
    Propose, Score and head calls travel joined), and each gets the images
    and counters it gets alone: its own loop makes its own draws."""
    options = dict(speculative="draft_model", num_draft_tokens=3, adaptive=False)
    cases = [([i % 10], 200 + i) for i in range(5)] + [([1, 8], 7)]
    alone = [client.generate_image(labels, seed=seed, **options) for labels, seed in cases]
    verifier = server.service.images.verifier
    verifier = getattr(verifier, "images", verifier)
    together, proposes = verifier.rounds.together, verifier.drafter.gather.items - verifier.drafter.gather.runs
    with ThreadPoolExecutor(len(cases)) as pool:
        joined = list(pool.map(lambda case: client.generate_image(case[0], seed=case[1], **options), cases))
    for a, b in zip(alone, joined, strict=True):
        assert np.array_equal(pixels(a), pixels(b))
        assert (a.stats.drafted_tokens, a.stats.accepted_tokens) == (b.stats.drafted_tokens, b.stats.accepted_tokens)
    assert verifier.rounds.together > together  # rounds started together
    assert verifier.drafter.gather.items - verifier.drafter.gather.runs > proposes  # Propose calls travelled joined


def test_unknown_image_model_is_not_found(client):
    with pytest.raises(NotFound, match="image model 'nope'"):
        client.generate_image([1], model="nope")
    with pytest.raises(NotFound, match="'smollm2-135m-instruct' is a text model"):
        client.generate_image([1], model="smollm2-135m-instruct")


def test_zero_draft_tokens_decode_plainly_as_for_text(client):
    """num_draft_tokens 0 drafts nothing (the proto's reading for text); images refused it."""
    plain = client.generate_image([5], seed=4, num_steps=8)
    zero = client.generate_image([5], seed=4, num_steps=8, speculative="draft_model", num_draft_tokens=0)
    assert zero.stats.drafted_tokens == 0 and zero.images[0].png == plain.images[0].png


def test_a_checkpoint_whose_hash_differs_is_refused(tmp_path):
    bad = tmp_path / "digits.safetensors"
    shutil.copy(CHECKPOINT_DIR / "digits.safetensors", bad)
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_file_checked(bad, HASHES["digits"])
    with pytest.raises(CheckpointError, match="no committed image checkpoint 'digits-huge'"):
        load_checkpoint("digits-huge")
    assert load_file_checked(CHECKPOINT_DIR / "digits.safetensors", HASHES["digits"]) is not None
