"""The give-up step shared by the optional accelerated MicroAdam steps (compiled, fused)."""

from __future__ import annotations

import warnings


def give_up(failures: list[str], err: Exception, message: str, stacklevel: int) -> None:
    """Records why an accelerated step failed (the first line of ``err``) in ``failures``, which
    its caller then reads to stay on the eager step, and warns once with ``message``, whose
    ``{reason}`` is that line. ``stacklevel`` counts from the caller, as for ``warnings.warn``."""
    failures.append(f"{type(err).__name__}: {err}".splitlines()[0][:500])
    warnings.warn(message.format(reason=failures[0]), RuntimeWarning, stacklevel=stacklevel + 1)
