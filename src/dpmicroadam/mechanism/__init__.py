"""The one thin layer where sampler, clipping, noise and accounting meet.

Everything private in a run is built here from a single :class:`DPConfig`, so the sampling rate the
accountant sees is the one the sampler uses, the noise std is derived from the clipping's
sensitivity, and one accountant event is recorded per released gradient. The pieces themselves
(``dpmicroadam.privacy``, ``dpmicroadam.data.sampler``, ``dpmicroadam.accounting``) know nothing of
each other.

Guarantee (add/remove-one neighbouring relation, unit of privacy = one training example with all its
augmented views): each call to :meth:`DPMechanism.privatize` releases
``(Σ_i clip_C(g_i) + N(0, σ²C² I)) / B`` for a batch drawn by Poisson sampling with rate ``q``;
the L2 sensitivity of the clipped sum is ``C``; the run is ``(ε, δ)``-DP with ε as reported by
:meth:`DPMechanism.epsilon` for the accountant named in the config. The caller must (1) take
batches only from :meth:`DPMechanism.sample`, (2) not look at per-example gradients or losses of
private data, and (3) treat everything after :meth:`privatize` as post-processing.
"""

from dpmicroadam.mechanism.config import DPConfig, check_privacy_settings, derive_seed
from dpmicroadam.mechanism.core import BudgetExhausted, DPMechanism, NonFiniteGradientError

__all__ = [
    "BudgetExhausted",
    "DPConfig",
    "DPMechanism",
    "NonFiniteGradientError",
    "check_privacy_settings",
    "derive_seed",
]
