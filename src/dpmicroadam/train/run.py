"""One run: build it from a config, then ``step()``, ``evaluate()``, ``save()``, or ``fit()``.

:class:`Run` is the public API of the training layer. `train`, `finetune` and `audit` all use it;
a feature changes a run only through :class:`RunHooks`:

- ``build_task(run)``: the data splits and the model (``finetune`` loads a pretrained model);
- ``started(run)``: the output folder exists (``finetune`` writes ``labels.json``);
- ``before_release(run)``: between the Poisson draw and the release (``audit`` adds canaries
  through :meth:`DPMechanism.inject_gradients`, which clips them itself);
- ``after_release(run)``: ``p.grad`` holds the released gradient, before the optimizer steps;
- ``summary(run, summary)``: extra fields for ``summary.json``.

One private step: ``mechanism.sample()`` (Poisson batch) → this rank's share, augmented views →
``before_release`` → ``mechanism.privatize`` (clip, sum, all-reduce, noise, one accountant event,
``p.grad``) → ``after_release`` → ``optimizer.step()`` → schedule, EMA.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch

from dpmicroadam import distributed
from dpmicroadam.data import augment_views
from dpmicroadam.data.sampler import PoissonSampler
from dpmicroadam.mechanism import DPConfig, DPMechanism, NonFiniteGradientError, derive_seed
from dpmicroadam.models.trainable import head_parameter_names
from dpmicroadam.train.builders import build_optimizer, build_schedule
from dpmicroadam.train.checkpoint import (
    CHECKPOINT,
    check_resume,
    load_checkpoint,
    make_out_dir,
    save_checkpoint,
    write_json,
)
from dpmicroadam.train.config import TrainConfig, resolve_config, steps_for
from dpmicroadam.train.ema import EMA
from dpmicroadam.train.hooks import ResumeMismatch, RunHooks, TrainingDiverged
from dpmicroadam.train.metrics import MetricsLog
from dpmicroadam.train.state import RunState
from dpmicroadam.train.task import cross_entropy_per_row, evaluate, image_layout

MIN_INTERVAL = 50  # steps between default evaluations and checkpoints

__all__ = ["CHECKPOINT", "ResumeMismatch", "Run", "RunHooks", "TrainingDiverged", "train"]


def train(config: TrainConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Train a model (privately for the dp-* optimizers) and return the run's summary.

    Args:
        config: A resolved :class:`TrainConfig`; or leave it ``None`` and pass settings as
            keywords (``train(dataset="digits", optimizer="dp-sgd", lr=0.5)``).

    Returns:
        The summary dict also written to ``<out>/summary.json``.
    """
    cfg = config if config is not None else resolve_config(overrides)
    return Run(cfg).fit()


class Run:
    """One run. Everything that shapes it lives in :attr:`state` and is restored on ``resume``.

    Args:
        cfg: A resolved config (:func:`~dpmicroadam.train.config.resolve_config`).
        hooks: The feature's hooks (default: plain `train`).
    """

    def __init__(self, cfg: TrainConfig, hooks: RunHooks | None = None) -> None:
        self.cfg = cfg
        self.hooks = hooks or RunHooks()
        self._owns_group = distributed.launched_by_torchrun() and not distributed.initialized()
        self.dist = distributed.setup(cfg.device)
        self.device = _device(cfg.device, self.dist)
        if self.dist.enabled and not cfg.private:
            raise ValueError(
                f"--optimizer {cfg.optimizer} under torchrun: data-parallel training is "
                "implemented for the private (dp-*) optimizers; run non-private baselines "
                "in one process"
            )
        self.out = Path(self.dist.broadcast_object(cfg.out or _default_out(cfg)))
        check_resume(cfg, self.out)
        self.dist.barrier()  # every rank has read the old run before rank 0 rewrites anything
        task = self.hooks.build_task(self)
        task.check()
        self.task = task
        self.x_train, self.y_train = task.x_train.to(self.device), task.y_train.to(self.device)
        self.x_val, self.y_val = task.x_val.to(self.device), task.y_val.to(self.device)
        self.x_test, self.y_test = task.x_test.to(self.device), task.y_test.to(self.device)
        model = task.model.to(self.device)
        self.n = int(self.x_train.shape[0])
        if cfg.batch_size > self.n:
            raise ValueError(
                f"--batch-size {cfg.batch_size:g} is larger than the training set ({self.n} "
                "examples after the validation split); use a smaller batch size"
            )
        self.total_steps = steps_for(cfg, self.n)
        self.params = [p for p in model.parameters() if p.requires_grad]
        mechanism = self._mechanism(model) if cfg.private else None
        sampler = mechanism.sampler if mechanism else _plain_sampler(cfg, self.n)
        noise_std = mechanism.noise_std if mechanism else 0.0
        optimizer = build_optimizer(self.params, cfg, noise_std, head=_head(model, self.params))
        self.state = RunState(
            model=model,
            optimizer=optimizer,
            schedule=build_schedule(optimizer, cfg, self.total_steps),
            mechanism=mechanism,
            sampler=sampler,
            ema=EMA(self.params, cfg.ema) if cfg.ema else None,
            augment_rng=torch.Generator().manual_seed(derive_seed(cfg.seed, "augment")),
        )
        # Default cadence: ten evaluations (and checkpoints) a run, at least MIN_INTERVAL steps
        # apart (each costs an evaluation, an exact ε and a file write), and always the last step.
        self.eval_every = cfg.eval_every or max(MIN_INTERVAL, self.total_steps // 10)
        self.checkpoint_every = cfg.checkpoint_every or self.eval_every
        self.step_seconds, self.steps_timed = 0.0, 0  # time in steps only, this process
        if self.dist.is_main:
            make_out_dir(self.out)
        self.dist.barrier()
        self.metrics = MetricsLog(self.out / "metrics.jsonl", fresh=not cfg.resume)
        self._resume_state()
        record = self.config_record()
        distributed.check_replicas_agree(
            self.dist,
            "config, initial parameters and optimizer state",
            [distributed.fingerprint(record), *self._replica_tensors()],
        )
        if self.dist.is_main:
            write_json(self.out / "config.json", record)
        self.hooks.started(self)

    # ------------------------------------------------------------------ parts
    @property
    def model(self) -> torch.nn.Module:
        return self.state.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.state.optimizer

    @property
    def mechanism(self) -> DPMechanism | None:
        return self.state.mechanism

    @property
    def step_count(self) -> int:
        return self.state.step

    def _mechanism(self, model: torch.nn.Module) -> DPMechanism:
        cfg = self.cfg
        config = DPConfig(
            dataset_size=self.n,
            expected_batch_size=float(cfg.batch_size),
            clip_norm=float(cfg.clip_norm),
            target_delta=cfg.delta,
            noise_multiplier=cfg.noise_multiplier,
            target_epsilon=cfg.epsilon,
            steps=self.total_steps,
            augmult=cfg.augmult,
            physical_batch_size=cfg.physical_batch_size,
            noise_seed=cfg.noise_seed,
            accountant=cfg.accountant,
            normalize=cfg.normalize,
            secure_noise=cfg.secure_noise,
            engine=cfg.engine,
        )
        group = self.dist.group if self.dist.enabled else None
        return DPMechanism(config, model, cross_entropy_per_row, process_group=group)

    def epsilon(self) -> float | None:
        """ε spent so far (None for a non-private run)."""
        return self.mechanism.epsilon() if self.mechanism is not None else None

    # ------------------------------------------------------------------ resume and save
    def config_record(self) -> dict[str, Any]:
        """The config as written to ``config.json``, with what was resolved at build time."""
        record = self.cfg.to_dict()
        if self.mechanism is not None:
            record["resolved_noise_multiplier"] = self.mechanism.noise_multiplier
            record["resolved_sample_rate"] = self.mechanism.sample_rate
        record["resolved_steps"] = self.total_steps
        return record

    def _resume_state(self) -> None:
        ckpt = self.out / CHECKPOINT
        if not (self.cfg.resume and ckpt.exists()):
            return
        self.state.load_state_dict(load_checkpoint(ckpt))
        if self.dist.is_main:
            self.metrics.truncate(self.state.step)

    def _replica_tensors(self) -> list[torch.Tensor]:
        """What must be identical on every data-parallel rank (checked before each save)."""
        return list(distributed.state_tensors(self.model.state_dict(), self.optimizer.state_dict()))

    def save(self) -> None:
        """Write the checkpoint atomically (rank 0), after checking the replicas agree."""
        if not all(bool(torch.isfinite(p).all()) for p in self.params):
            raise TrainingDiverged(
                f"step {self.state.step}: a parameter is NaN or infinite (diverged); lower --lr. "
                f"The last good checkpoint in {str(self.out / CHECKPOINT)!r} is kept."
            )
        distributed.check_replicas_agree(
            self.dist,
            f"parameters and optimizer state at step {self.state.step}",
            self._replica_tensors(),
        )
        if self.dist.is_main:
            save_checkpoint(self.out / CHECKPOINT, self.state.state_dict())

    # ------------------------------------------------------------------ one step
    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        mech, cfg = self.mechanism, self.cfg
        idx = mech.sample() if mech is not None else self.state.sampler.sample()
        # Data-parallel: every rank drew the same batch; it keeps its contiguous share.
        share = distributed.shard(torch.arange(idx.numel()), self.dist.rank, self.dist.world_size)
        if cfg.augmult == 1:
            idx = idx[share]
        idx = idx.to(self.device)
        x, y = self.x_train[idx], self.y_train[idx]
        if cfg.augmult > 1:
            pad, flip = (4, True) if cfg.dataset == "cifar10" else (2, False)
            # The whole batch is augmented on every rank so augment_rng stays in lock step (and
            # the views equal the one-process run's); then each rank keeps its share.
            x = augment_views(x.cpu(), cfg.augmult, self.state.augment_rng, pad=pad, flip=flip)
            share = share.to(self.device)
            x, y = x.to(self.device)[share], y[share]
            if self.x_train.dim() == 4 and self.x_train.stride(1) == 1:
                x = image_layout(x)  # the views in the layout of the held images
        return x, y

    def step(self) -> dict[str, float]:
        """One optimizer step on one Poisson batch; returns statistics of the step.

        Raises:
            TrainingDiverged: On a NaN/inf loss or gradient (nothing is released).
        """
        t0 = time.perf_counter()
        x, y = self._batch()
        stats: dict[str, float] = {}
        mech = self.mechanism
        if mech is not None:
            self.hooks.before_release(self)
            try:
                stats = mech.privatize(x, y)
            except NonFiniteGradientError as err:
                raise self._diverged(str(err)) from err
            if self.cfg.log_train_loss and y.numel():
                with torch.no_grad():
                    stats["train_loss"] = float(self._train_loss(x, y))
        else:
            self.optimizer.zero_grad(set_to_none=True)
            if y.numel():
                loss = self._train_loss(x, y)
                if not torch.isfinite(loss):
                    raise self._diverged(f"the training loss is {loss.item()} (diverged).")
                loss.backward()
                stats["train_loss"] = loss.item()
        self.hooks.after_release(self)
        self.optimizer.step()
        self.state.schedule.step()
        if self.state.ema is not None:
            self.state.ema.update()
        self.state.step += 1
        self.step_seconds += time.perf_counter() - t0
        self.steps_timed += 1
        return stats

    def _train_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(0, 1) if self.cfg.augmult > 1 else x
        targets = y.repeat_interleave(self.cfg.augmult)
        return cross_entropy_per_row(self.model(rows), targets).mean()

    def _diverged(self, what: str) -> TrainingDiverged:
        return TrainingDiverged(
            f"step {self.state.step + 1}: {what} Lower --lr. The last good checkpoint in "
            f"{str(self.out / CHECKPOINT)!r} is kept."
        )

    # ------------------------------------------------------------------ evaluation
    def weights(self) -> contextlib.AbstractContextManager:
        """Context in which the model holds the weights to evaluate (the EMA's, if enabled)."""
        ema = self.state.ema
        return ema.swapped() if ema is not None else contextlib.nullcontext()

    def evaluate(self, split: str = "test") -> tuple[float, float]:
        """(accuracy, mean loss) on ``"train"``, ``"val"`` or ``"test"`` (EMA weights if enabled)."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        with self.weights():
            return evaluate(self.model, x, y, self.task.eval_batch_size)

    def _log_eval(self, wall: float, stats: dict[str, float]) -> dict[str, Any]:
        val_acc, val_loss = self.evaluate("val")
        test_acc, test_loss = self.evaluate("test")
        if self.y_test.numel() and not math.isfinite(test_loss):
            raise TrainingDiverged(
                f"step {self.state.step}: the test loss is {test_loss} (diverged); lower --lr. "
                f"The last good checkpoint in {str(self.out / CHECKPOINT)!r} is kept."
            )
        row = {
            "step": self.state.step,
            "epoch": self.state.step * self.cfg.batch_size / self.n,
            "epsilon": _finite_or_none(self.epsilon()) if self.mechanism else None,
            "val_accuracy": _finite_or_none(val_acc),
            "val_loss": _finite_or_none(val_loss),
            "test_accuracy": _finite_or_none(test_acc),
            "test_loss": _finite_or_none(test_loss),
            "lr": self.optimizer.param_groups[0]["lr"],
            "wall_seconds": round(wall, 3),
        }
        if "train_loss" in stats and self.cfg.log_train_loss:
            row["train_loss"] = stats["train_loss"]
        if self.dist.is_main:
            self.metrics.append(row)
        return row

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_at: int | None = None) -> dict[str, Any] | None:
        """Train to the end (or to step ``stop_at``), evaluating and checkpointing on the way.

        Returns:
            The summary (also written to ``summary.json``), or None when stopped at ``stop_at``
            before the end (a later ``fit`` or ``--resume`` continues from the last checkpoint).
        """
        from dpmicroadam.train.progress import Progress

        start = time.perf_counter()
        before = self.state.wall_seconds
        last: dict[str, Any] = self.metrics.rows[-1] if self.metrics.rows else {}
        end = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        bar = Progress(self, enabled=self.cfg.progress and self.dist.is_main)
        try:
            while self.state.step < end:
                with distributed.collective_errors(self.dist, f"step {self.state.step + 1}"):
                    stats = self.step()
                self.state.wall_seconds = before + time.perf_counter() - start
                at_end = self.state.step == self.total_steps
                if self.state.step % self.eval_every == 0 or at_end:
                    last = self._log_eval(self.state.wall_seconds, stats)
                    bar.evaluated(last)
                if self.state.step % self.checkpoint_every == 0 or at_end:
                    self.save()
                bar.stepped(stats)
            if self.state.step < self.total_steps:
                return None
            summary = self.summary(last)
            if self.dist.is_main:
                write_json(self.out / "summary.json", summary)
                from dpmicroadam.plots import plot_run

                plot_run(self.metrics.rows, self.out, f"{self.cfg.optimizer} · {self.cfg.dataset}")
            self.dist.barrier()
            return summary
        finally:
            bar.close()
            if self._owns_group:
                distributed.shutdown(self.dist)

    def summary(self, last: dict[str, Any] | None = None) -> dict[str, Any]:
        """The run's summary: accuracy, ε spent and how, settings, memory and time."""
        from dpmicroadam.train.summary import run_summary

        summary = run_summary(self, last if last is not None else self.metrics.last())
        self.hooks.summary(self, summary)
        return summary


def _device(name: str, dist: distributed.DistContext) -> torch.device:
    device = torch.device(name)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    return device


def _head(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The trainable parameters of the classification head (empty when none is found)."""
    try:
        names = set(head_parameter_names(model))
    except ValueError:
        return []
    trainable = {id(p) for p in params}
    return [p for n, p in model.named_parameters() if n in names and id(p) in trainable]


def _plain_sampler(cfg: TrainConfig, n: int) -> PoissonSampler:
    return PoissonSampler(n, cfg.batch_size / n, seed=derive_seed(cfg.seed, "sampler"))


def _default_out(cfg: TrainConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.dataset.replace(":", "_").replace("/", "_")
    return str(Path("runs") / f"{stamp}-{name}-{cfg.optimizer}-s{cfg.seed}")


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None
