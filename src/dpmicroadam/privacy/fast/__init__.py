"""Fast per-example clipping: layer rules, ghost norms and book-keeping.

``FastEngine`` implements the ``ClippedSumEngine`` protocol of :mod:`dpmicroadam.privacy`;
``supports(model)`` tells the engine factory whether to pick it. See docs/fast-clipping.md.
"""

from .engine import FastEngine
from .plan import supports

__all__ = ["FastEngine", "supports"]
