"""Datasets, the Poisson sampler and augmentations (augmult)."""

from dpmicroadam.data.augment import augment_views
from dpmicroadam.data.datasets import (
    DATASET_NAMES,
    DIGITS_SPLIT_SEED,
    NORMALIZATION,
    default_data_dir,
    load_dataset,
    split_validation,
)
from dpmicroadam.data.download import download_file, verify_file
from dpmicroadam.data.image_dataset import ImageDataset
from dpmicroadam.data.sampler import PoissonSampler
from dpmicroadam.data.text import encode_texts, load_text_table

__all__ = [
    "encode_texts",
    "load_text_table",
    "DATASET_NAMES",
    "DIGITS_SPLIT_SEED",
    "NORMALIZATION",
    "PoissonSampler",
    "ImageDataset",
    "augment_views",
    "default_data_dir",
    "download_file",
    "load_dataset",
    "split_validation",
    "verify_file",
]
