"""The resolved configuration of a run: defaults < tuned defaults < recipe < TOML < flags.

Every field carries its flag's help text (and its choices) in the dataclass metadata: the command
line, the TOML checks and the docs are built from these fields, so a setting is declared once.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from dpmicroadam.optim.quantize import SUPPORTED_BITS
from dpmicroadam.train.checks import (
    check_types,
    validate_given,
    validate_names,
    validate_values,
)
from dpmicroadam.train.defaults import tuned_defaults
from dpmicroadam.train.names import (  # noqa: F401 - re-exported: the names of the settings
    ACCOUNTANTS,
    DATASETS,
    EF_ROUNDINGS,
    ENGINES,
    LR_SCHEDULES,
    MICROADAM_IMPLEMENTATIONS,
    MODELS,
    NORMALIZE,
    OPTIMIZERS,
    PRIVATE_OPTIMIZERS,
    PUBLIC_OPTIMIZERS,
)

# Fields that do not change what a run computes: they may differ on --resume.
RUNTIME_FIELDS = ("out", "resume", "json", "progress", "config", "recipe")


def setting(default: Any = None, help: str = "", **meta: Any) -> Any:
    """A config field with its command-line metadata.

    Args:
        default: The field's default (a list default is copied per instance).
        help: The flag's help text.
        **meta: ``choices`` (closed set of values), ``flag`` (a flag name other than the field's
            name with dashes), ``cli=False`` (not a flag), ``metavar``.
    """
    if isinstance(default, (list, dict)):
        return field(
            default_factory=lambda: type(default)(default), metadata={"help": help, **meta}
        )
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Every knob of `dpmicroadam train` (names from SPEC.md; flags are the same with dashes)."""

    config: str | None = setting(None, "TOML file with any of these settings (flags win)")
    recipe: str | None = setting(None, "a shipped recipe, e.g. cifar10-wrn16-4")
    dataset: str = setting("digits", f"one of {', '.join(DATASETS)}")
    data_dir: str | None = setting(None, "folder with the dataset files")
    download: bool = setting(False, "download the dataset (with checksum) when it is missing")
    model: str | None = setting(None, "model (default by dataset)", choices=MODELS)
    width: int = setting(1, "channel multiplier of the 28x28 cnn (1: the published 26 k-parameter "
                         "network)")  # fmt: skip
    optimizer: str = setting("dp-microadam", "the optimizer; dp-* are private", choices=OPTIMIZERS)
    epsilon: float | None = setting(8.0, "target ε; σ is calibrated so ε spent ≤ target")
    delta: float = setting(1e-5, "target δ")
    noise_multiplier: float | None = setting(None, "σ, instead of --epsilon")
    accountant: str = setting("pld", "privacy accountant", choices=ACCOUNTANTS)
    epochs: float | None = setting(
        None, "training length in epochs (expected passes over the data)"
    )
    steps: int | None = setting(None, "training length in optimizer steps (instead of --epochs)")
    batch_size: float | None = setting(None, "expected (logical) batch size B = q·N")
    physical_batch_size: int | None = setting(None, "examples per forward/backward (memory only)")
    clip_norm: float | None = setting(None, "per-example clipping threshold C")
    lr: float | None = setting(None, "learning rate")
    lr_schedule: str = setting("constant", "learning-rate schedule", choices=LR_SCHEDULES)
    warmup_fraction: float = setting(0.05, "share of the steps in warm-up (warmup-cosine)")
    momentum: float | None = setting(None, "SGD momentum, in [0, 1)")
    weight_decay: float = setting(0.0, "decoupled weight decay")
    window_size: int | None = setting(None, "MicroAdam window m")
    density: float | None = setting(None, "MicroAdam top-k density k/d")
    density_1d: float | None = setting(None, "MicroAdam density for 1-D tensors (biases, norms)")
    density_head: float | None = setting(
        None, "MicroAdam density for the classification head (a new head is small: 1.0 keeps "
        "it dense for little memory)")  # fmt: skip
    ef_bits: int | str | None = setting(
        4, "MicroAdam error-feedback bits: 4, 5, 6, 8 or none (exact)")  # fmt: skip
    ef_rounding: str = setting(
        "nearest", "MicroAdam error-feedback rounding: nearest (SPEC) or stochastic (unbiased; "
        "keeps low-density runs from losing small gradients, docs/results.md)",
        choices=EF_ROUNDINGS)  # fmt: skip
    topk_block: str = setting(
        "auto", "MicroAdam top-k: auto (blocks of 32768 entries, int16 indices) or whole (the "
        "whole tensor, as the authors' code)", choices=("auto", "whole"))  # fmt: skip
    microadam_values: str = setting(
        "bfloat16", "dtype of MicroAdam's stored window values (float32: as the authors' code)",
        choices=("bfloat16", "float32"))  # fmt: skip
    microadam_implementation: str = setting(
        "fast", "MicroAdam's step: fast (vectorized), fused (two C++ loops on the CPU: about half "
        "the time of fast, built once per machine in ~16 s; fast where it cannot be built, with "
        "a warning), compiled (torch.compile) or loop (the slow reference)",
        choices=MICROADAM_IMPLEMENTATIONS)  # fmt: skip
    adam_eps: float | None = setting(None, "eps of Adam and MicroAdam (default 1e-8)")
    adam_eps_noise: float | None = setting(
        None, "eps of DP-Adam and DP-MicroAdam as a multiple of the released gradient's noise "
        "std σC/B (0: the default 1e-8); overrides --adam-eps")  # fmt: skip
    adambc_gamma: float = setting(1e-9, "DP-AdamBC floor γ of the corrected second moment")
    augmult: int = setting(1, "augmented views per example K (averaged before clipping)")
    ema: float | None = setting(None, "EMA decay of the weights used for evaluation")
    seed: int = setting(0, "seed of the initialization, the validation split and the "
                        "augmentations (public)")  # fmt: skip
    noise_seed: int | None = setting(
        None, "seed of the noise and the Poisson sampling. Default: OS entropy, whose state "
        "lives only in the checkpoint (keep it as secret as the data). A fixed value makes runs "
        "reproducible; the guarantee then assumes it stays secret")  # fmt: skip
    val_fraction: float = setting(0.1, "fraction of the training data held out for validation")
    eval_every: int | None = setting(
        None, "evaluate every N steps (default: a tenth of the run, at least 50 steps apart; "
        "always at the end)")  # fmt: skip
    checkpoint_every: int | None = setting(
        None, "checkpoint every N steps (default: at each evaluation; always at the end)"
    )
    engine: str = setting("auto", "per-example gradient engine", choices=ENGINES)
    normalize: str = setting("expected", "divide the noisy sum by the expected or the realized "
                             "batch size", choices=NORMALIZE)  # fmt: skip
    secure_noise: bool = setting(False, "seed the noise from OS entropy (not reproducible)")
    log_train_loss: bool = setting(False, "log the training loss (private data: not a private "
                                   "output)")  # fmt: skip
    device: str = setting("cpu", "cpu, cuda, cuda:1, ...")
    out: str | None = setting(
        None, "output folder (default runs/<time>-<dataset>-<optimizer>-s<seed>)"
    )
    resume: bool = setting(False, "continue the run in --out from its last checkpoint")
    json: bool = setting(False, "print the summary as one JSON object on stdout, nothing else")
    progress: bool = setting(True, "show the progress bar")
    defaults_source: dict[str, str] = setting({}, cli=False)

    # A default of the key is not filled in when the user set the field it names (a tuned eps
    # multiple never overrides the user's own --adam-eps).
    DEFAULT_YIELDS_TO: typing.ClassVar[dict[str, str]] = {"adam_eps_noise": "adam_eps"}
    # Base defaults, used where neither the user nor a tuned default sets a value.
    BASE_DEFAULTS: typing.ClassVar[dict[str, Any]] = {
        "clip_norm": 1.0,
        "lr": 1e-3,
        "momentum": 0.0,
        "window_size": 10,
        "density": 0.01,
        "batch_size": 256,
        "physical_batch_size": 256,
        "epochs": 10,
    }
    DEFAULT_MODEL: typing.ClassVar[dict[str, str]] = {
        "digits": "mlp",
        "fashion-mnist": "cnn",
        "mnist": "cnn",
        "cifar10": "wrn16-4",
    }

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

    # ------------------------------------------------------------------ resolution steps
    def tuned(self) -> tuple[dict[str, Any], str]:
        """Defaults found by a validation search for this dataset and optimizer, and their source."""
        return tuned_defaults(self.dataset, self.optimizer)

    def check_names(self) -> None:
        """Check the names (dataset, model, optimizer, ...) before defaults are filled in."""
        validate_names(self)

    def fill_defaults(self, user_set: set[str]) -> None:
        """Fill what the user left unset: tuned defaults, then base defaults (with sources)."""
        if self.model is None:
            self.model = self.DEFAULT_MODEL.get(self.dataset, "mlp")
        tuned, source = self.tuned()
        for key in set(self.BASE_DEFAULTS) | set(tuned):
            if key in self.DEFAULT_YIELDS_TO and self.DEFAULT_YIELDS_TO[key] in user_set:
                continue
            if getattr(self, key, None) is None and key not in user_set:
                if key in tuned:
                    setattr(self, key, tuned[key])
                    self.defaults_source[key] = source
                elif key in self.BASE_DEFAULTS:
                    setattr(self, key, self.BASE_DEFAULTS[key])
                    self.defaults_source[key] = "built-in default"
        if self.steps is not None:
            self.epochs = None
        if isinstance(self.ef_bits, str):
            raw = self.ef_bits.lower()
            widths = [str(b) for b in SUPPORTED_BITS]
            if raw not in (*widths, "none", "exact"):
                raise ValueError(
                    f"--ef-bits must be {', '.join(widths)} or none, got {self.ef_bits!r}"
                )
            self.ef_bits = None if raw in ("none", "exact") else int(raw)

    def validate(self, user_set: set[str] | frozenset[str] = frozenset()) -> None:
        """Check the values; raise ValueError naming the flag and a fix.

        Args:
            user_set: The settings a user gave (flags, TOML, recipe): a privacy setting given
                to a non-private optimizer, or --steps with --epochs, is refused, not ignored.
        """
        validate_values(self)
        validate_given(self, set(user_set))


C = TypeVar("C", bound=TrainConfig)


def load_toml(path: str | Path, table: str = "train") -> dict[str, Any]:
    """Read a TOML config (keys as flag names, dashes or underscores) into field names.

    A ``[train]`` (or ``[<table>]``) table is used when present, else the top-level keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    with path.open("rb") as fh:
        try:
            raw = tomllib.load(fh)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    if isinstance(raw.get(table), dict):
        raw = raw[table]
    return {k.replace("-", "_"): v for k, v in raw.items()}


def recipe_path(name: str) -> Path:
    """Path of a shipped recipe (a TOML file in dpmicroadam/recipes)."""
    root = resources.files("dpmicroadam") / "recipes"
    available = sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))
    if name not in available:
        raise ValueError(f"unknown recipe {name!r}; available recipes: {', '.join(available)}")
    return Path(str(root / f"{name}.toml"))


def resolve_config(overrides: dict[str, Any] | None = None, cls: type[C] = TrainConfig) -> C:
    """Resolve a run's config: base defaults < tuned defaults < recipe < TOML < ``overrides``.

    Args:
        overrides: Only the values a user set (flags or Python keywords); ``None`` means unset.
        cls: The config class (``TrainConfig`` or a subclass such as ``FinetuneConfig``).

    Raises:
        ValueError: For unknown keys, values of the wrong type, or bad values (the message names
            the flag or key and the file it came from).
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    names = {f.name for f in dataclasses.fields(cls)} - {"defaults_source"}
    _check_known(given, names, "unknown config keys")
    check_types(cls, given, "settings")
    layered: dict[str, Any] = {}
    if given.get("recipe"):
        path = recipe_path(given["recipe"])
        layered.update(_from_file(path, cls, names))
    if given.get("config"):
        layered.update(_from_file(given["config"], cls, names))
    layered.update(given)
    cfg = cls(**layered)
    if "noise_multiplier" in layered and "epsilon" not in layered:
        cfg.epsilon = None
    cfg.check_names()
    cfg.fill_defaults(set(layered))
    cfg.validate(set(layered))
    return cfg


def _from_file(path: str | Path, cls: type, names: set[str]) -> dict[str, Any]:
    values = load_toml(path, table=getattr(cls, "TOML_TABLE", "train"))
    where = f"config file {str(path)!r}"
    _check_known(values, names, f"{where}: unknown config keys")
    check_types(cls, values, where)
    return values


def _check_known(values: dict[str, Any], names: set[str], what: str) -> None:
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{what} {unknown}; valid keys: {sorted(names)}")


def steps_for(cfg: TrainConfig, dataset_size: int) -> int:
    """Number of optimizer steps: --steps, or epochs · N / B rounded up."""
    if cfg.steps is not None:
        return int(cfg.steps)
    return max(1, math.ceil(cfg.epochs * dataset_size / cfg.batch_size))
