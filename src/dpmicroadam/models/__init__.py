"""Models: MLP, tanh CNNs, WRN-16-4 with GroupNorm and weight standardization."""

from dpmicroadam.models.cnn import TanhCNN28, TanhCNN32
from dpmicroadam.models.factory import MODEL_NAMES, build_model
from dpmicroadam.models.hf import HFSequenceClassifier, load_hf_classifier
from dpmicroadam.models.mlp import MLP
from dpmicroadam.models.norm import replace_batchnorm
from dpmicroadam.models.trainable import TRAINABLE_MODES, select_trainable
from dpmicroadam.models.wrn import PreActBlock, WideResNet, WSConv2d

__all__ = [
    "HFSequenceClassifier",
    "TRAINABLE_MODES",
    "load_hf_classifier",
    "select_trainable",
    "MLP",
    "MODEL_NAMES",
    "PreActBlock",
    "TanhCNN28",
    "TanhCNN32",
    "WSConv2d",
    "WideResNet",
    "build_model",
    "replace_batchnorm",
]
