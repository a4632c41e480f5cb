"""augment_views: shapes, determinism, agreement with a slow per-view reference, flip rate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpmicroadam.data import augment_views


def _reference_view(image, top, left, mirrored, pad):
    """One view the slow way: pad, slice, maybe flip."""
    padded = F.pad(image[None], (pad, pad, pad, pad), mode="reflect")[0] if pad else image
    h, w = image.shape[-2:]
    crop = padded[:, top : top + h, left : left + w]
    return crop.flip(-1) if mirrored else crop


def _draws(generator, n, pad, flip):
    """Replay the documented draw order: tops, lefts, flips."""
    top = torch.randint(0, 2 * pad + 1, (n,), generator=generator) if pad else torch.zeros(n)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=generator) if pad else torch.zeros(n)
    mirrored = torch.randint(0, 2, (n,), generator=generator) if flip else torch.zeros(n)
    return top.long(), left.long(), mirrored.bool()


def test_shape_dtype_and_determinism():
    x = torch.randn(3, 2, 8, 10)
    a = augment_views(x, 5, torch.Generator().manual_seed(0))
    b = augment_views(x, 5, torch.Generator().manual_seed(0))
    c = augment_views(x, 5, torch.Generator().manual_seed(1))
    assert a.shape == (3, 5, 2, 8, 10) and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(("pad", "flip"), [(4, True), (2, False), (0, True), (3, True)])
def test_each_view_is_a_crop_of_the_padded_image(pad, flip):
    x = torch.randn(4, 3, 9, 7)
    k = 6
    views = augment_views(x, k, torch.Generator().manual_seed(11), pad=pad, flip=flip)
    top, left, mirrored = _draws(torch.Generator().manual_seed(11), 4 * k, pad, flip)
    for i in range(4):
        for j in range(k):
            n = i * k + j
            expected = _reference_view(x[i], top[n], left[n], mirrored[n], pad)
            assert torch.equal(views[i, j], expected), (i, j)


def test_identity_when_no_augmentation():
    x = torch.randn(5, 1, 6, 6)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    out = augment_views(x, 1, generator, pad=0, flip=False)
    assert out.shape == (5, 1, 1, 6, 6) and torch.equal(out[:, 0], x)
    assert torch.equal(generator.get_state(), state)  # nothing drawn
    out3 = augment_views(x, 3, generator, pad=0, flip=False)
    assert all(torch.equal(out3[:, j], x) for j in range(3))


def test_flip_probability_is_one_half():
    # Asymmetric image, no padding: each view is either x or its mirror.
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = augment_views(x, 4000, torch.Generator().manual_seed(5), pad=0, flip=True)[0]
    flipped = (views == x.flip(-1)).flatten(1).all(1)
    same = (views == x).flatten(1).all(1)
    assert bool((flipped ^ same).all())
    rate = flipped.float().mean().item()
    assert abs(rate - 0.5) < 4 * (0.25 / 4000) ** 0.5  # 4 standard errors


def test_offsets_cover_the_whole_range():
    # A single bright pixel in a zero image: its position in each view reveals the offset.
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    views = augment_views(x, 2000, torch.Generator().manual_seed(2), pad=2, flip=False)[0, :, 0]
    rows = views.amax(dim=2).argmax(dim=1)
    assert set(rows.tolist()) == {2, 3, 4, 5, 6}


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"augmult": 0}, ValueError, "augmult"),
        ({"augmult": 2.0}, ValueError, "augmult"),
        ({"pad": 8}, ValueError, "pad"),
        ({"pad": -1}, ValueError, "pad"),
        ({"generator": 0}, TypeError, "generator"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    args = {"augmult": 2, "generator": torch.Generator(), "pad": 2}
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        augment_views(torch.zeros(2, 1, 8, 8), **args)
    with pytest.raises(ValueError, match="b, C, H, W"):
        augment_views(torch.zeros(1, 8, 8), 2, torch.Generator())
    with pytest.raises(TypeError, match="floating"):
        augment_views(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), 2, torch.Generator())


def test_empty_batch_is_allowed():
    # Poisson sampling can draw an empty batch; augmentation must pass it through.
    out = augment_views(torch.zeros(0, 3, 8, 8), 4, torch.Generator(), pad=2)
    assert out.shape == (0, 4, 3, 8, 8)
