"""The checks of a run's settings: types (flags, TOML, Python), names, values, combinations.

Every message names the flag (``--clip-norm``), the value and the fix. The privacy rules (C, K,
σ, ε, δ) are ``DPConfig``'s (``dpmicroadam.mechanism.check_privacy_settings``), applied here
before any data is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import TYPE_CHECKING, Any

from dpmicroadam.mechanism import check_privacy_settings
from dpmicroadam.train.names import DATASETS, MODELS, OPTIMIZERS

if TYPE_CHECKING:  # pragma: no cover
    from dpmicroadam.train.config import TrainConfig

__all__ = [
    "PRIVACY_SETTINGS",
    "check_types",
    "field_types",
    "validate_given",
    "validate_names",
    "validate_values",
]


def field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """Each field's accepted Python types (``None`` as ``type(None)``), from the annotations."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[type, ...]] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        out[f.name] = tuple(typing.get_origin(m) or m for m in members)
    return out


def check_types(cls: type, values: dict[str, Any], where: str) -> None:
    """Raise ValueError when a value has the wrong type for its field (TOML, Python keywords).

    An int is accepted for a float field; a bool is never taken for a number; a string is never
    taken for a switch (``"false"`` would otherwise count as true).
    """
    kinds = field_types(cls)
    for key, value in values.items():
        accepted = kinds.get(key)
        if accepted is None or value is None:
            continue
        if isinstance(value, bool):
            ok = bool in accepted
        elif isinstance(value, int):
            ok = int in accepted or float in accepted
        elif isinstance(value, float):
            ok = float in accepted
        else:
            ok = isinstance(value, tuple(t for t in accepted if t is not type(None)))
        if ok and isinstance(value, list):
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            names = " or ".join(
                _TYPE_NAMES.get(t, t.__name__) for t in accepted if t is not type(None)
            )
            raise ValueError(f"{where}: {key} = {value!r} has the wrong type; {key} takes {names}")


_TYPE_NAMES = {
    float: "a number",
    int: "an integer",
    bool: "true or false",
    str: "a string",
    list: "a list of strings",
    dict: "a table",
    type(None): "nothing (unset)",
}


def validate_names(cfg: TrainConfig) -> None:
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
        )
    if not (cfg.dataset in DATASETS[:-1] or cfg.dataset.startswith("npz:")):
        raise ValueError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    if cfg.model is not None and cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {', '.join(MODELS)}")
    # Every other setting of `train` with a closed set of values (its field's ``choices``),
    # checked here before any data is loaded rather than by the optimizer at build time (the
    # commands built on TrainConfig check their own settings, in their own words).
    from dpmicroadam.train.config import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        allowed = f.metadata.get("choices")
        if allowed is None or f.name in ("optimizer", "dataset", "model"):
            continue
        if getattr(cfg, f.name) not in allowed:
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            raise ValueError(
                f"{flag} {getattr(cfg, f.name)!r} is unknown; choose one of "
                f"{', '.join(map(str, allowed))}"
            )


PRIVACY_SETTINGS = (
    "epsilon", "delta", "noise_multiplier", "accountant", "clip_norm", "normalize",
    "secure_noise", "noise_seed",
)  # fmt: skip


def validate_given(cfg: TrainConfig, user_set: set[str]) -> None:
    """Refuse settings that would be silently ignored."""
    if not cfg.private:
        ignored = [k for k in PRIVACY_SETTINGS if k in user_set]
        if ignored:
            flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
            raise ValueError(
                f"{flags} would be ignored: --optimizer {cfg.optimizer} is not private; use "
                f"dp-{cfg.optimizer} for a private run, or drop {flags}"
            )
    if "steps" in user_set and "epochs" in user_set:
        raise ValueError(
            "give --steps or --epochs, not both (a recipe or --config file may set one of them)"
        )
    if cfg.momentum and cfg.optimizer not in ("dp-sgd", "sgd"):
        raise ValueError(
            f"--momentum {cfg.momentum:g} would be ignored: momentum applies to dp-sgd and sgd, "
            f"not --optimizer {cfg.optimizer}; drop it"
        )
    if cfg.resume and cfg.out is None:
        raise ValueError("--resume needs --out with the folder of the run to continue")


def _check_device(name: str) -> None:
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name}: this machine has no CUDA device (or this torch build has no "
                "CUDA); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda are supported")


def validate_values(cfg: TrainConfig) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(msg)

    if cfg.private:
        need(
            (cfg.epsilon is None) != (cfg.noise_multiplier is None),
            "give either --epsilon or --noise-multiplier, not both "
            f"(got epsilon={cfg.epsilon!r}, noise_multiplier={cfg.noise_multiplier!r})",
        )
    try:  # the privacy rules are DPConfig's; checked here too, before any data is loaded
        check_privacy_settings(
            cfg.clip_norm if cfg.private else 1.0,
            cfg.augmult,
            cfg.noise_multiplier if cfg.private else None,
            cfg.epsilon if cfg.private else None,
            cfg.delta,
        )
    except (TypeError, ValueError) as err:
        raise ValueError(_as_flags(str(err))) from None
    need(cfg.lr >= 0, f"--lr must be >= 0, got {cfg.lr!r}")
    need(cfg.batch_size > 0, f"--batch-size must be > 0, got {cfg.batch_size!r}")
    need(
        cfg.physical_batch_size >= 1,
        f"--physical-batch-size must be >= 1, got {cfg.physical_batch_size!r}",
    )
    need(0 <= cfg.val_fraction < 1, f"--val-fraction must be in [0, 1), got {cfg.val_fraction!r}")
    need(0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum!r}")
    for key in ("eval_every", "checkpoint_every"):
        value = getattr(cfg, key)
        flag = "--" + key.replace("_", "-")
        need(value is None or value >= 1, f"{flag} must be >= 1 (steps), got {value!r}")
    need(cfg.window_size >= 1, f"--window-size must be >= 1, got {cfg.window_size!r}")
    need(cfg.width >= 1, f"--width must be >= 1, got {cfg.width!r}")
    need(cfg.width == 1 or cfg.model == "cnn", f"--width {cfg.width} applies to --model cnn only")
    need(cfg.adam_eps is None or cfg.adam_eps > 0, f"--adam-eps must be > 0, got {cfg.adam_eps!r}")
    need(
        cfg.adam_eps_noise is None or (cfg.adam_eps_noise >= 0 and cfg.private),
        f"--adam-eps-noise must be >= 0 and needs a private optimizer, got {cfg.adam_eps_noise!r}",
    )
    if cfg.steps is not None:
        need(cfg.steps >= 1, f"--steps must be >= 1, got {cfg.steps!r}")
    else:
        need(cfg.epochs is not None and cfg.epochs > 0, f"--epochs must be > 0, got {cfg.epochs!r}")
    if cfg.ema is not None:
        need(0 < cfg.ema < 1, f"--ema (decay) must be in (0, 1), got {cfg.ema!r}")
    need(
        0 <= cfg.warmup_fraction < 1,
        f"--warmup-fraction must be in [0, 1), got {cfg.warmup_fraction!r}",
    )
    for key in ("density", "density_1d", "density_head"):
        value = getattr(cfg, key)
        if value is not None:
            need(0 < value <= 1, f"--{key.replace('_', '-')} must be in (0, 1], got {value!r}")
    need(
        math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
        f"--weight-decay must be >= 0, got {cfg.weight_decay!r}",
    )
    need(math.isfinite(cfg.lr), f"--lr must be finite, got {cfg.lr!r}")
    _check_device(cfg.device)


_FLAG_OF = {
    "clip_norm": "--clip-norm",
    "augmult": "--augmult",
    "noise_multiplier": "--noise-multiplier",
    "target_epsilon": "--epsilon",
    "target_delta": "--delta",
}


def _as_flags(message: str) -> str:
    """A mechanism message in the words of the command line (``clip_norm`` -> ``--clip-norm``)."""
    return re.sub(r"\b(" + "|".join(_FLAG_OF) + r")\b", lambda m: _FLAG_OF[m.group(1)], message)
