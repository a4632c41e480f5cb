"""Which parameters a fine-tuning run trains: all, bias (DP-BiTFiT), head, or LoRA.

None of these choices looks at data: they depend on the architecture only, so they spend no
privacy budget. (A data-driven choice, e.g. picking the layers with the largest gradients on
the private set, would have to be privatized and accounted.)

- ``all``: every parameter.
- ``bias``: DP-BiTFiT (Bu et al., arXiv 2210.00036): every bias term plus the classification
  head. Per-example gradients of biases are cheap and the trained part is ~0.1 % of the model.
- ``head``: the classification head only (linear probing of the pretrained features).
- ``lora``: low-rank adapters (Hu et al., arXiv 2106.09685) through ``peft`` on the attention
  projections, plus the head; the pretrained weights stay frozen. Adapter dropout is 0.

The head of a ``transformers`` model is everything outside its base model
(``base_model_prefix``, e.g. ``classifier`` and, when present, a pre-classifier layer); for any
other module it is the modules named in ``head=`` or, by default, the last ``nn.Linear``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = [
    "TRAINABLE_MODES",
    "head_module",
    "head_parameter_names",
    "select_trainable",
    "trainable_count",
]

TRAINABLE_MODES = ("all", "bias", "head", "lora")


def _inner(model: nn.Module) -> nn.Module:
    """The transformers model inside an ``HFSequenceClassifier`` (or the model itself)."""
    return getattr(model, "hf", model)


def head_parameter_names(model: nn.Module, head: Sequence[str] | None = None) -> list[str]:
    """Names (in ``model.named_parameters()``) of the classification head's parameters.

    Args:
        model: A transformers model, an ``HFSequenceClassifier``, or any module.
        head: Module paths of the head (e.g. ``["fc"]``); default: found as described in the
            module docstring.

    Raises:
        ValueError: If a given head path is not a module of ``model`` or no head is found.
    """
    names = [n for n, _ in model.named_parameters()]
    if head is not None:
        modules = dict(model.named_modules())
        missing = [h for h in head if h not in modules]
        if missing:
            raise ValueError(
                f"head={list(head)!r}: {missing} are not modules of the model; pass module "
                "paths from model.named_modules()"
            )
        return [n for n in names if any(n.startswith(h + ".") for h in head)]
    inner = _inner(model)
    prefix = getattr(inner, "base_model_prefix", None)
    backbone = getattr(inner, prefix, None) if prefix else None
    if isinstance(backbone, nn.Module):
        # The backbone's path by identity, not by name: peft's LoRA wrapper forwards
        # ``inner.bert`` to ``base_model.model.bert``, so "hf.bert." would match no name and
        # every parameter, the adapters included, would pass for the head.
        where = next((n for n, m in model.named_modules() if m is backbone), "")
        found = [n for n in names if not n.startswith(f"{where}.")] if where else []
    else:
        linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
        found = [n for n in names if linears and n.startswith(linears[-1] + ".")]
    if not found:
        raise ValueError(
            f"could not find the classification head of {type(model).__name__}; pass head= "
            "with the module paths of the head"
        )
    return found


def head_module(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(path, module)`` when exactly the trainable parameters are those of one module.

    That is the case of ``trainable="head"`` on a model whose head is one layer (BERT's
    ``classifier``): the rest of the model is then a frozen function of each example, and its
    output at the head's input can be computed once (see ``dpmicroadam.train.features``).
    Returns None otherwise.
    """
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    if not trained:
        return None
    for path, module in model.named_modules():
        if not path:
            continue
        own = {f"{path}.{n}" for n, _ in module.named_parameters()}
        if own == trained:
            return path, module
    return None


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter entries."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, total


def select_trainable(
    model: nn.Module,
    mode: str,
    *,
    head: Sequence[str] | None = None,
    lora_r: int = 8,
    lora_alpha: float | None = None,
    lora_target_modules: Sequence[str] | None = None,
) -> nn.Module:
    """Set ``requires_grad`` for fine-tuning mode ``mode`` (in place; LoRA wraps the model).

    Args:
        model: A transformers ``*ForSequenceClassification`` model, an ``HFSequenceClassifier``,
            or any module (then ``lora`` needs ``lora_target_modules``).
        mode: One of ``all``, ``bias``, ``head``, ``lora``.
        head: Module paths of the head (default: found automatically).
        lora_r: LoRA rank r >= 1.
        lora_alpha: LoRA scaling numerator (default 2·r).
        lora_target_modules: Module names to adapt (default: peft's choice for the architecture,
            the attention query/value projections for BERT-like models).

    Returns:
        The model to train: ``model`` itself, except ``lora`` on a bare transformers model,
        which returns the peft wrapper (an ``HFSequenceClassifier`` keeps its identity and
        wraps its inner model).

    Raises:
        ValueError: For an unknown mode or bad LoRA settings.
        ImportError: For ``lora`` without peft installed.
    """
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"trainable mode {mode!r} is unknown; choose one of {TRAINABLE_MODES}")
    if mode == "lora":
        return _apply_lora(model, head, lora_r, lora_alpha, lora_target_modules)
    head_names = set(head_parameter_names(model, head))
    for name, p in model.named_parameters():
        if mode == "all":
            p.requires_grad_(True)
        elif mode == "head":
            p.requires_grad_(name in head_names)
        else:  # bias
            p.requires_grad_(name in head_names or name.endswith("bias"))
    return model


def _apply_lora(
    model: nn.Module,
    head: Sequence[str] | None,
    r: int,
    alpha: float | None,
    targets: Sequence[str] | None,
) -> nn.Module:
    try:
        import peft
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "trainable='lora' needs the 'peft' package: pip install dpmicroadam[finetune]"
        ) from err
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora_r must be an int >= 1, got {r!r}")
    inner = _inner(model)
    is_hf = hasattr(inner, "base_model_prefix") and hasattr(inner, "config")
    if not is_hf and targets is None:
        raise ValueError(
            f"trainable='lora' on a {type(inner).__name__} (not a transformers model) needs "
            "lora_target_modules, e.g. ['fc1', 'fc2']"
        )
    head_modules = _head_modules(inner, head)
    kwargs: dict[str, Any] = dict(
        r=r,
        lora_alpha=float(2 * r if alpha is None else alpha),
        lora_dropout=0.0,
        modules_to_save=head_modules,
    )
    if targets is not None:
        kwargs["target_modules"] = list(targets)
    if is_hf:
        kwargs["task_type"] = peft.TaskType.SEQ_CLS
    wrapped = peft.get_peft_model(inner, peft.LoraConfig(**kwargs))
    if inner is not model:
        model.hf = wrapped
        return model
    return wrapped


def _head_modules(inner: nn.Module, head: Sequence[str] | None) -> list[str]:
    """Top-level module names of the head, as peft's ``modules_to_save`` wants them."""
    if head is not None:
        return list(head)
    names = head_parameter_names(inner)
    return sorted({n.rsplit(".", 1)[0] for n in names})
