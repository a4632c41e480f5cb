"""The resolved configuration of a training run: defaults < tuned defaults < TOML < flags."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dpmicroadam.train.defaults import tuned_defaults

PRIVATE_OPTIMIZERS = ("dp-microadam", "dp-sgd", "dp-adam", "dp-adambc")
PUBLIC_OPTIMIZERS = ("microadam", "adam", "sgd")
OPTIMIZERS = PRIVATE_OPTIMIZERS + PUBLIC_OPTIMIZERS
DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "npz:PATH")
MODELS = ("mlp", "cnn", "wrn16-4")
LR_SCHEDULES = ("constant", "cosine", "warmup-cosine")
ACCOUNTANTS = ("pld", "rdp")
ENGINES = ("auto", "vmap", "fast")

# Fields that do not change what a run computes: they may differ on --resume.
RUNTIME_FIELDS = ("out", "resume", "json", "progress", "config", "recipe")


@dataclass
class TrainConfig:
    """Every knob of `dpmicroadam train` (names from SPEC.md; flags are the same with dashes)."""

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    model: str | None = None
    optimizer: str = "dp-microadam"
    epsilon: float | None = 8.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    accountant: str = "pld"
    epochs: float | None = None
    steps: int | None = None
    batch_size: float | None = None
    physical_batch_size: int | None = None
    clip_norm: float | None = None
    lr: float | None = None
    lr_schedule: str = "constant"
    warmup_fraction: float = 0.05
    momentum: float | None = None
    weight_decay: float = 0.0
    window_size: int | None = None
    density: float | None = None
    density_1d: float | None = None
    ef_bits: int | str | None = 4  # 4, 8, or "none" (exact fp32 error feedback)
    adambc_gamma: float = 1e-9
    augmult: int = 1
    ema: float | None = None
    seed: int = 0
    val_fraction: float = 0.1
    eval_every: int | None = None
    checkpoint_every: int | None = None
    engine: str = "auto"
    normalize: str = "expected"
    secure_noise: bool = False
    log_train_loss: bool = False
    device: str = "cpu"
    out: str | None = None
    resume: bool = False
    json: bool = False
    progress: bool = True
    config: str | None = None
    recipe: str | None = None
    defaults_source: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived
    @property
    def private(self) -> bool:
        return self.optimizer in PRIVATE_OPTIMIZERS

    def comparable(self) -> dict[str, Any]:
        """The fields that must match for --resume to continue the same run."""
        d = dataclasses.asdict(self)
        for k in (*RUNTIME_FIELDS, "defaults_source"):
            d.pop(k, None)
        return d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


BASE_DEFAULTS: dict[str, Any] = {
    "clip_norm": 1.0,
    "lr": 1e-3,
    "momentum": 0.0,
    "window_size": 10,
    "density": 0.01,
    "batch_size": 256,
    "physical_batch_size": 256,
    "epochs": 10,
}
DEFAULT_MODEL = {"digits": "mlp", "fashion-mnist": "cnn", "mnist": "cnn", "cifar10": "wrn16-4"}


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config (keys as flag names, dashes or underscores) into field names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    with path.open("rb") as fh:
        raw = tomllib.load(fh)
    raw = raw.get("train", raw)
    return {k.replace("-", "_"): v for k, v in raw.items()}


def recipe_path(name: str) -> Path:
    """Path of a shipped recipe (a TOML file in dpmicroadam/recipes)."""
    root = resources.files("dpmicroadam") / "recipes"
    available = sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))
    if name not in available:
        raise ValueError(f"unknown recipe {name!r}; available recipes: {', '.join(available)}")
    return Path(str(root / f"{name}.toml"))


def resolve_config(overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Resolve a run's config: base defaults < tuned defaults < recipe < TOML < ``overrides``.

    ``overrides`` holds only the values a user set (flags or Python keywords); ``None`` values are
    treated as unset.
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(names)}")
    layered: dict[str, Any] = {}
    if given.get("recipe"):
        layered.update(load_toml(recipe_path(given["recipe"])))
    if given.get("config"):
        layered.update(load_toml(given["config"]))
    layered.update(given)
    unknown = sorted(set(layered) - names)
    if unknown:
        raise ValueError(
            f"unknown config keys {unknown} in the TOML file; valid keys: {sorted(names)}"
        )
    cfg = TrainConfig(**{k: v for k, v in layered.items() if k != "defaults_source"})
    if "noise_multiplier" in layered and "epsilon" not in layered:
        cfg.epsilon = None
    _validate_names(cfg)
    if cfg.model is None:
        cfg.model = DEFAULT_MODEL.get(cfg.dataset, "mlp")
    tuned, source = tuned_defaults(cfg.dataset, cfg.optimizer)
    for key in set(BASE_DEFAULTS) | set(tuned):
        if getattr(cfg, key, None) is None and key not in layered:
            if key in tuned:
                setattr(cfg, key, tuned[key])
                cfg.defaults_source[key] = source
            elif key in BASE_DEFAULTS:
                setattr(cfg, key, BASE_DEFAULTS[key])
                cfg.defaults_source[key] = "built-in default"
    if cfg.steps is not None:
        cfg.epochs = None
    if isinstance(cfg.ef_bits, str):
        raw = cfg.ef_bits.lower()
        if raw not in ("4", "8", "none", "exact"):
            raise ValueError(f"ef_bits must be 4, 8 or none, got {cfg.ef_bits!r}")
        cfg.ef_bits = None if raw in ("none", "exact") else int(raw)
    _validate_values(cfg)
    return cfg


def _validate_names(cfg: TrainConfig) -> None:
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
        )
    if not (cfg.dataset in DATASETS[:-1] or cfg.dataset.startswith("npz:")):
        raise ValueError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    if cfg.model is not None and cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {', '.join(MODELS)}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(
            f"unknown lr_schedule {cfg.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}"
        )
    if cfg.accountant not in ACCOUNTANTS:
        raise ValueError(
            f"unknown accountant {cfg.accountant!r}; choose one of {', '.join(ACCOUNTANTS)}"
        )
    if cfg.engine not in ENGINES:
        raise ValueError(f"unknown engine {cfg.engine!r}; choose one of {', '.join(ENGINES)}")


def _validate_values(cfg: TrainConfig) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(msg)

    if cfg.private:
        need(
            (cfg.epsilon is None) != (cfg.noise_multiplier is None),
            "give either --epsilon or --noise-multiplier, not both "
            f"(got epsilon={cfg.epsilon!r}, noise_multiplier={cfg.noise_multiplier!r})",
        )
        if cfg.epsilon is not None:
            need(cfg.epsilon > 0, f"--epsilon must be > 0, got {cfg.epsilon!r}")
        if cfg.noise_multiplier is not None:
            need(
                cfg.noise_multiplier >= 0,
                f"--noise-multiplier must be >= 0, got {cfg.noise_multiplier!r}",
            )
        need(0 < cfg.delta < 1, f"--delta must be in (0, 1), got {cfg.delta!r}")
        need(cfg.clip_norm > 0, f"--clip-norm must be > 0, got {cfg.clip_norm!r}")
    need(cfg.lr >= 0, f"--lr must be >= 0, got {cfg.lr!r}")
    need(cfg.batch_size > 0, f"--batch-size must be > 0, got {cfg.batch_size!r}")
    need(
        cfg.physical_batch_size >= 1,
        f"--physical-batch-size must be >= 1, got {cfg.physical_batch_size!r}",
    )
    need(cfg.augmult >= 1, f"--augmult must be >= 1, got {cfg.augmult!r}")
    need(0 <= cfg.val_fraction < 1, f"--val-fraction must be in [0, 1), got {cfg.val_fraction!r}")
    if cfg.steps is not None:
        need(cfg.steps >= 1, f"--steps must be >= 1, got {cfg.steps!r}")
    else:
        need(cfg.epochs is not None and cfg.epochs > 0, f"--epochs must be > 0, got {cfg.epochs!r}")
    if cfg.ema is not None:
        need(0 < cfg.ema < 1, f"--ema (decay) must be in (0, 1), got {cfg.ema!r}")
    need(
        0 <= cfg.warmup_fraction < 1,
        f"warmup_fraction must be in [0, 1), got {cfg.warmup_fraction!r}",
    )
    need(
        math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
        f"--weight-decay must be >= 0, got {cfg.weight_decay!r}",
    )


def steps_for(cfg: TrainConfig, dataset_size: int) -> int:
    """Number of optimizer steps: --steps, or epochs · N / B rounded up."""
    if cfg.steps is not None:
        return int(cfg.steps)
    return max(1, math.ceil(cfg.epochs * dataset_size / cfg.batch_size))
