"""Sanity check for δ against the dataset size."""

from __future__ import annotations

import warnings

from dpmicroadam.accounting._validate import check_delta_range as _validate_delta


class PrivacyWarning(UserWarning):
    """A setting is valid but weakens the privacy guarantee in a way users usually do not want."""


def check_delta(delta: float, dataset_size: int) -> float:
    """Validate δ and warn with :class:`PrivacyWarning` when δ ≥ 1/N.

    An (ε, δ)-DP mechanism with δ ≥ 1/N allows publishing a whole record with probability δ
    (release each of the N records with probability δ each), so δ should be well below 1/N;
    1/N^1.1 or a fixed 1e-5 for N ≤ 10⁵ are common choices.

    Args:
        delta: δ in (0, 1).
        dataset_size: N ≥ 1, the number of examples (the unit of privacy).

    Returns:
        δ as a float.

    Raises:
        ValueError: δ outside (0, 1) or ``dataset_size`` < 1.
    """
    d = _validate_delta(delta)
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
        raise ValueError(f"dataset_size must be an int >= 1, got {dataset_size!r}")
    if d >= 1.0 / dataset_size:
        warnings.warn(
            f"delta={d:g} is >= 1/dataset_size = 1/{dataset_size}: such a guarantee allows "
            f"publishing a record outright with probability delta; use delta well below "
            f"{1.0 / dataset_size:.3g}",
            PrivacyWarning,
            stacklevel=2,
        )
    return d
