"""The names a run's settings choose from (optimizers, datasets, models, ...)."""

from dpmicroadam.optim.microadam import EF_ROUNDINGS  # noqa: F401 - re-exported
from dpmicroadam.optim.microadam import IMPLEMENTATIONS as MICROADAM_IMPLEMENTATIONS  # noqa: F401

PRIVATE_OPTIMIZERS = ("dp-microadam", "dp-sgd", "dp-adam", "dp-adambc")
PUBLIC_OPTIMIZERS = ("microadam", "adam", "sgd")
OPTIMIZERS = PRIVATE_OPTIMIZERS + PUBLIC_OPTIMIZERS
DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "npz:PATH")
MODELS = ("mlp", "cnn", "wrn16-4")
LR_SCHEDULES = ("constant", "cosine", "warmup-cosine")
ACCOUNTANTS = ("pld", "rdp")
ENGINES = ("auto", "vmap", "fast")
NORMALIZE = ("expected", "realized")
