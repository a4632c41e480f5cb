"""Augmentation multiplicity (augmult): K random views of each example.

De et al. (arXiv 2204.13650) average the gradients of K augmented views of an example *before*
clipping; the views here are the CIFAR-10 recipe's: a random crop of the original size from the
image reflect-padded by ``pad`` pixels, and a random horizontal flip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment_views(
    x: torch.Tensor,
    augmult: int,
    generator: torch.Generator,
    pad: int = 4,
    flip: bool = True,
) -> torch.Tensor:
    """Make ``augmult`` random views of every image, all at once.

    View ``k`` of image ``i`` is ``crop(reflect_pad(x[i], pad), top, left)`` with
    ``top, left`` uniform on ``{0, ..., 2*pad}``, mirrored left-right with probability 1/2
    when ``flip``. Randomness comes only from ``generator``, drawn in this order: tops (b*K),
    lefts (b*K), flips (b*K); nothing is drawn when ``pad == 0 and not flip``. The crop is a
    single gather over the padded batch (no Python loop over examples).

    Args:
        x: Float images, (b, C, H, W).
        augmult: Views per example, K >= 1.
        generator: The ``torch.Generator`` that drives the offsets and flips (on CPU or on
            ``x``'s device).
        pad: Reflect padding in pixels, 0 <= pad < min(H, W).
        flip: Whether to flip horizontally with probability 1/2.

    Returns:
        Tensor of shape (b, K, C, H, W), same dtype and device as ``x``.

    Raises:
        ValueError: on a bad shape, ``augmult`` or ``pad``.
        TypeError: if ``x`` is not floating point or ``generator`` is not a torch.Generator.
    """
    b, c, h, w = _check_views_args(x, augmult, generator, pad)
    n = b * augmult
    if pad == 0 and not flip:
        return x.unsqueeze(1).expand(b, augmult, c, h, w).clone()

    gdev = generator.device
    if pad > 0:
        top = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev)
        left = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev)
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    else:
        top = torch.zeros(n, dtype=torch.long, device=gdev)
        left = torch.zeros(n, dtype=torch.long, device=gdev)
        padded = x
    if flip:
        mirrored = torch.randint(0, 2, (n,), generator=generator, device=gdev).bool()
    else:
        mirrored = torch.zeros(n, dtype=torch.bool, device=gdev)
    top, left, mirrored = top.to(x.device), left.to(x.device), mirrored.to(x.device)

    rows = top[:, None] + torch.arange(h, device=x.device)  # (n, H)
    cols_fwd = torch.arange(w, device=x.device)
    cols = left[:, None] + torch.where(mirrored[:, None], w - 1 - cols_fwd, cols_fwd)  # (n, W)
    example = torch.arange(b, device=x.device).repeat_interleave(augmult)  # (n,)
    channel = torch.arange(c, device=x.device)
    views = padded[
        example[:, None, None, None],
        channel[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]  # (n, C, H, W)
    return views.view(b, augmult, c, h, w)


def _check_views_args(
    x: torch.Tensor, augmult: int, generator: torch.Generator, pad: int
) -> tuple[int, int, int, int]:
    """Validate :func:`augment_views`' arguments; return ``(b, C, H, W)``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a (b, C, H, W) tensor, got {shape}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got dtype {x.dtype}; convert images first")
    if isinstance(augmult, bool) or not isinstance(augmult, int) or augmult < 1:
        raise ValueError(f"augmult={augmult!r} must be an integer >= 1")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    b, c, h, w = x.shape
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0 or pad >= min(h, w):
        raise ValueError(
            f"pad={pad!r} must be an integer in [0, {min(h, w) - 1}] for {h}x{w} images "
            "(reflect padding needs pad < image size)"
        )
    return b, c, h, w
