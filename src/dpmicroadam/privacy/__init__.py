"""Per-example gradients, clipping, noise and the private-gradient release.

Independent of the other core packages; ``dpmicroadam.mechanism`` ties these pieces to the
sampler and the accountant.
"""

from .checks import check_per_example_safe
from .engine import ClippedSumEngine, make_engine
from .noise import GaussianNoise
from .per_example import VmapEngine
from .release import PrivateGradient, ReleaseStats

__all__ = [
    "ClippedSumEngine",
    "GaussianNoise",
    "PrivateGradient",
    "ReleaseStats",
    "VmapEngine",
    "check_per_example_safe",
    "make_engine",
]
