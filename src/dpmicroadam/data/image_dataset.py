"""The in-memory image dataset type returned by the loaders."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageDataset:
    """An image-classification dataset held in memory.

    Attributes:
        name: The dataset's name as given to :func:`load_dataset`.
        x_train: Float32 training images, N x C x H x W, normalized.
        y_train: Int64 training labels in ``[0, num_classes)``.
        x_test: Float32 test images (the official test split: evaluate only, never tune).
        y_test: Int64 test labels.
        num_classes: Number of classes.
        input_shape: ``(C, H, W)``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
