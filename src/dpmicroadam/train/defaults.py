"""Tuned defaults per (dataset, optimizer), each with the evidence it came from.

A value here is used only when the user did not set it. Every entry names its source: a
validation-split search whose rows are committed under ``results/`` (see docs/results.md).
"""

from __future__ import annotations

from typing import Any

# (dataset, optimizer) -> (settings, source)
TUNED: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}


def tuned_defaults(dataset: str, optimizer: str) -> tuple[dict[str, Any], str]:
    """Settings found best on the validation split for this dataset and optimizer, and their source."""
    settings, source = TUNED.get((dataset, optimizer), ({}, "built-in default"))
    return dict(settings), source
