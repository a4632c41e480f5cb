"""Which rule computes the per-example gradients of which parameter.

Every trainable parameter is assigned to the module that directly owns it (``recurse=False``):

* a stock ``Linear``, ``Conv1d``, ``Conv2d``, ``Embedding``, ``LayerNorm`` or ``GroupNorm`` gets
  its fast rule; a ``Conv1d``/``Conv2d`` subclass with its own forward (weight standardization)
  gets the reparametrized-conv rule;
* any other module owning a trainable parameter falls back to ``torch.func`` and takes every
  trainable parameter of its sub-tree with it (its forward may use its children's parameters
  without calling them, as ``nn.MultiheadAttention`` does with ``out_proj``).

A parameter owned by two modules (weight tying) is refused: use the vmap engine.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .conv import ConvOwner
from .fallback import FallbackOwner
from .linear import LinearOwner
from .owner import Owner
from .small import EmbeddingOwner, GroupNormOwner, LayerNormOwner
from .wsconv import ReparamConvOwner


def _stock(module: nn.Module, base: type) -> bool:
    return isinstance(module, base) and type(module).forward is base.forward


def fast_rule(module: nn.Module) -> type[Owner] | None:
    """The fast rule for ``module``, or ``None`` if it needs the ``torch.func`` fallback."""
    if _stock(module, nn.Linear):
        return LinearOwner
    for base in (nn.Conv1d, nn.Conv2d):
        if isinstance(module, base):
            return ConvOwner if type(module).forward is base.forward else ReparamConvOwner
    if _stock(module, nn.Embedding):
        plain = module.max_norm is None and not module.scale_grad_by_freq
        return EmbeddingOwner if plain else None
    if _stock(module, nn.LayerNorm):
        return LayerNormOwner
    if _stock(module, nn.GroupNorm):
        return GroupNormOwner
    return None


def tied_parameters(model: nn.Module) -> list[str]:
    """Names of parameters directly owned by more than one module (or twice by one)."""
    seen: dict[int, str] = {}
    tied = []
    for mod_name, module in model.named_modules(remove_duplicate=True):
        for name, p in module.named_parameters(recurse=False, remove_duplicate=False):
            full = f"{mod_name}.{name}" if mod_name else name
            if id(p) in seen:
                tied.append(f"{seen[id(p)]} = {full}")
            else:
                seen[id(p)] = full
    return tied


def build_owners(model: nn.Module, params: Iterable[nn.Parameter]) -> list[Owner]:
    """Assigns each parameter in ``params`` to one owner.

    Raises:
        ValueError: if a parameter is tied, or is not a parameter of ``model``.
    """
    tied = tied_parameters(model)
    if tied:
        raise ValueError(
            f"model has tied parameters ({', '.join(tied)}); the fast engine needs each "
            "parameter owned by one module: use engine='vmap'"
        )
    wanted = {id(p) for p in params}
    owners: list[Owner] = []
    covered: set[int] = set()
    visited: set[int] = set()

    def visit(prefix: str, module: nn.Module) -> None:
        if id(module) in visited:
            return
        visited.add(id(module))
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) in wanted]
        rule = fast_rule(module)
        name = prefix or type(module).__name__
        if own and rule is None:
            sub = [(n, p) for n, p in module.named_parameters() if id(p) in wanted]
            owners.append(FallbackOwner(name, module, sub))
            covered.update(id(p) for _, p in sub)
            return
        if own:
            owners.append(rule(name, module, own))
            covered.update(id(p) for _, p in own)
        for child_name, child in module.named_children():
            visit(f"{prefix}.{child_name}" if prefix else child_name, child)

    visit("", model)
    missing = wanted - covered
    if missing:
        raise ValueError(
            f"params: {len(missing)} tensor(s) are not parameters of the model; pass "
            "parameters of `model` (or params=None for all trainable ones)"
        )
    return owners


def supports(model: nn.Module) -> bool:
    """Whether the fast engine suits ``model``.

    True when no parameter is tied and at least half of the trainable parameter entries sit
    in modules with a fast rule (the rest fall back to ``torch.func`` per module).
    """
    if tied_parameters(model):
        return False
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in params)
    if total == 0:
        return False
    owners = build_owners(model, params)
    fast = sum(p.numel() for o in owners if not isinstance(o, FallbackOwner) for _, p in o.params)
    return fast * 2 >= total
