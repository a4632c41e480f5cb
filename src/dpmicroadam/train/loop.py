"""The training loop behind `dpmicroadam train`: sample, privatize, step, evaluate, checkpoint."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dpmicroadam.data import augment_views, load_dataset, split_validation
from dpmicroadam.data.sampler import PoissonSampler
from dpmicroadam.mechanism import DPConfig, DPMechanism, NonFiniteGradientError, derive_seed
from dpmicroadam.models import build_model
from dpmicroadam.optim import state_bytes
from dpmicroadam.train import distributed
from dpmicroadam.train.builders import build_optimizer, build_schedule
from dpmicroadam.train.checkpoint import load_checkpoint, save_checkpoint
from dpmicroadam.train.config import TrainConfig, resolve_config, steps_for
from dpmicroadam.train.ema import EMA
from dpmicroadam.train.metrics import MetricsLog, plot_run

VAL_SPLIT_SEED = (
    20240521  # one fixed validation split for every run, so tuning compares like with like
)
CHECKPOINT = "checkpoint.pt"


class TrainingDiverged(FloatingPointError):
    """The loss or a gradient became NaN/inf; the last good checkpoint is kept."""


class ResumeMismatch(ValueError):
    """--resume was asked with a config that differs from the saved run's."""


def cross_entropy_per_row(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def train(config: TrainConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Train a model (privately for the dp-* optimizers) and return the run's summary.

    Args:
        config: A resolved :class:`TrainConfig`; or leave it ``None`` and pass flag names as keywords
            (``train(dataset="digits", optimizer="dp-sgd", lr=0.5)``).

    Returns:
        The summary dict also written to ``<out>/summary.json``.
    """
    cfg = config if config is not None else resolve_config(overrides)
    return Trainer(cfg).run()


class Trainer:
    """One run. Everything that shapes it is restored from the checkpoint on ``resume``."""

    def __init__(self, cfg: TrainConfig, *, stop_after: int | None = None) -> None:
        self.cfg = cfg
        self.stop_after = stop_after  # tests: stop (as if killed) after this many steps
        self._owns_group = distributed.launched_by_torchrun() and not _dist_initialized()
        self.dist = distributed.setup(cfg.device)  # torchrun: W data-parallel replicas
        self.device = torch.device(cfg.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if self.dist.enabled and not cfg.private:
            raise ValueError(
                f"--optimizer {cfg.optimizer} under torchrun: data-parallel training is "
                "implemented for the private (dp-*) optimizers; run non-private baselines "
                "in one process"
            )
        self.out = Path(self.dist.broadcast_object(cfg.out or _default_out(cfg)))
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_resume()
        self.dist.barrier()  # every rank has read the old run before rank 0 rewrites anything

        splits, self.model = self.build_task()
        x_tr, y_tr, x_val, y_val, x_test, y_test = splits
        self.x_tr, self.y_tr = x_tr.to(self.device), y_tr.to(self.device)
        self.x_val, self.y_val = x_val.to(self.device), y_val.to(self.device)
        self.x_test, self.y_test = x_test.to(self.device), y_test.to(self.device)
        self.model.to(self.device)
        self.n = int(self.x_tr.shape[0])
        if cfg.batch_size > self.n:
            raise ValueError(
                f"--batch-size {cfg.batch_size:g} is larger than the training set ({self.n} "
                "examples after the validation split); use a smaller batch size"
            )
        self.total_steps = steps_for(cfg, self.n)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

        self.mechanism: DPMechanism | None = None
        if cfg.private:
            self.mechanism = DPMechanism(
                DPConfig(
                    dataset_size=self.n,
                    expected_batch_size=float(cfg.batch_size),
                    clip_norm=float(cfg.clip_norm),
                    target_delta=cfg.delta,
                    noise_multiplier=cfg.noise_multiplier,
                    target_epsilon=cfg.epsilon,
                    steps=self.total_steps,
                    augmult=cfg.augmult,
                    physical_batch_size=cfg.physical_batch_size,
                    seed=cfg.seed,
                    accountant=cfg.accountant,
                    normalize=cfg.normalize,
                    secure_noise=cfg.secure_noise,
                    engine=cfg.engine,
                ),
                self.model,
                cross_entropy_per_row,
                process_group=self.dist.group if self.dist.enabled else None,
            )
            self.sampler = self.mechanism.sampler
        else:
            self.sampler = PoissonSampler(
                self.n, cfg.batch_size / self.n, seed=derive_seed(cfg.seed, "sampler")
            )
        noise_std = self.mechanism.noise_std if self.mechanism else 0.0
        self.optimizer = build_optimizer(self.params, cfg, noise_std=noise_std)
        self.schedule = build_schedule(self.optimizer, cfg, self.total_steps)
        self.ema = EMA(self.params, cfg.ema) if cfg.ema else None
        self.augment_rng = torch.Generator().manual_seed(derive_seed(cfg.seed, "augment"))
        self.step = 0
        self.step_seconds = 0.0  # time in training steps (no evaluation or checkpoints)
        self.steps_timed = 0
        self.wall_before = 0.0
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        n_evals = 10
        self.eval_every = cfg.eval_every or max(1, self.total_steps // n_evals)
        self.checkpoint_every = cfg.checkpoint_every or self.eval_every
        self._resume_state()
        distributed.check_replicas_agree(
            self.dist,
            "config, initial parameters and optimizer state",
            [distributed.fingerprint(self._config_record()), *self._replica_tensors()],
        )
        if self.dist.is_main:
            (self.out / "config.json").write_text(json.dumps(self._config_record(), indent=2))

    def build_task(self) -> tuple[tuple[torch.Tensor, ...], nn.Module]:
        """Data splits (x_train, y_train, x_val, y_val, x_test, y_test) and the seeded model.

        Subclasses (fine-tuning) override this; inputs may be any tensor whose first dimension
        indexes examples.
        """
        cfg = self.cfg
        data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download)
        x_tr, y_tr, x_val, y_val = split_validation(
            data.x_train, data.y_train, cfg.val_fraction, seed=VAL_SPLIT_SEED
        )
        model = model_for(cfg, tuple(data.input_shape), data.num_classes)
        return (x_tr, y_tr, x_val, y_val, data.x_test, data.y_test), model

    # ------------------------------------------------------------------ resume
    def _config_record(self) -> dict[str, Any]:
        record = self.cfg.to_dict()
        if self.mechanism is not None:
            record["resolved_noise_multiplier"] = self.mechanism.noise_multiplier
            record["resolved_sample_rate"] = self.mechanism.sample_rate
        record["resolved_steps"] = self.total_steps
        return record

    def _check_resume(self) -> None:
        saved = self.out / "config.json"
        ckpt = self.out / CHECKPOINT
        if not self.cfg.resume:
            if ckpt.exists():
                raise ValueError(
                    f"{str(self.out)!r} already holds a run; pass --resume to continue it or choose "
                    "another --out"
                )
            if self.metrics_path_exists() and self.dist.is_main:
                (self.out / "metrics.jsonl").unlink()
            return
        if saved.exists():
            old = json.loads(saved.read_text())
            new = self.cfg.comparable()
            diff = sorted(k for k in new if k in old and old[k] != new[k])
            if diff:
                details = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in diff)
                raise ResumeMismatch(
                    f"--resume refuses a changed config ({details}); rerun with the saved "
                    f"settings in {str(saved)!r} or start a new run with another --out"
                )

    def metrics_path_exists(self) -> bool:
        return (self.out / "metrics.jsonl").exists()

    def _resume_state(self) -> None:
        ckpt = self.out / CHECKPOINT
        if not (self.cfg.resume and ckpt.exists()):
            return
        state = load_checkpoint(ckpt)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.mechanism is not None:
            self.mechanism.load_state_dict(state["mechanism"])
        else:
            self.sampler.load_state_dict(state["sampler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.augment_rng.set_state(state["augment_rng"])
        self.step = int(state["step"])
        self.wall_before = float(state["wall_seconds"])
        if self.dist.is_main:
            self.metrics.truncate(self.step)

    def _replica_tensors(self) -> list[torch.Tensor]:
        """What must be identical on every data-parallel rank (checked before each save)."""
        return list(distributed.state_tensors(self.model.state_dict(), self.optimizer.state_dict()))

    def _save(self, wall: float) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in self.params):
            raise TrainingDiverged(
                f"step {self.step}: a parameter is NaN or infinite (diverged); lower --lr. The "
                f"last good checkpoint in {str(self.out / CHECKPOINT)!r} is kept."
            )
        # Collective: every rank checks the replicas agree, then only rank 0 writes (atomically).
        distributed.check_replicas_agree(
            self.dist,
            f"parameters and optimizer state at step {self.step}",
            self._replica_tensors(),
        )
        if not self.dist.is_main:
            return
        state: dict[str, Any] = {
            "step": self.step,
            "wall_seconds": wall,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "augment_rng": self.augment_rng.get_state(),
        }
        if self.mechanism is not None:
            state["mechanism"] = self.mechanism.state_dict()
        else:
            state["sampler"] = self.sampler.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        save_checkpoint(self.out / CHECKPOINT, state)

    # ------------------------------------------------------------------ steps
    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.mechanism.sample() if self.mechanism else self.sampler.sample()
        # Data-parallel: every rank drew the same batch; it keeps its contiguous share.
        share = distributed.shard(torch.arange(idx.numel()), self.dist.rank, self.dist.world_size)
        if self.cfg.augmult == 1:
            idx = idx[share]
        idx = idx.to(self.device)
        x, y = self.x_tr[idx], self.y_tr[idx]
        if self.cfg.augmult > 1:
            pad, flip = (4, True) if self.cfg.dataset == "cifar10" else (2, False)
            # The whole batch is augmented on every rank so augment_rng stays in lock step (and
            # the views equal the one-process run's); then each rank keeps its share.
            x = augment_views(x.cpu(), self.cfg.augmult, self.augment_rng, pad=pad, flip=flip)
            share = share.to(self.device)
            x, y = x.to(self.device)[share], y[share]
        return x, y

    def _train_step(self) -> dict[str, float]:
        x, y = self._batch()
        stats: dict[str, float] = {}
        if self.mechanism is not None:
            try:
                stats = self.mechanism.privatize(x, y)
            except NonFiniteGradientError as err:
                raise TrainingDiverged(
                    f"step {self.step + 1}: {err} The last good checkpoint in "
                    f"{str(self.out / CHECKPOINT)!r} is kept."
                ) from err
        else:
            self.optimizer.zero_grad(set_to_none=True)
            if y.numel():
                rows = x.flatten(0, 1) if self.cfg.augmult > 1 else x
                targets = y.repeat_interleave(self.cfg.augmult)
                loss = cross_entropy_per_row(self.model(rows), targets).mean()
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"step {self.step + 1}: the training loss is {loss.item()} (diverged); "
                        f"lower --lr. The last good checkpoint in "
                        f"{str(self.out / CHECKPOINT)!r} is kept."
                    )
                loss.backward()
                stats["train_loss"] = loss.item()
        if self.cfg.log_train_loss and self.mechanism is not None and y.numel():
            with torch.no_grad():
                rows = x.flatten(0, 1) if self.cfg.augmult > 1 else x
                targets = y.repeat_interleave(self.cfg.augmult)
                stats["train_loss"] = float(cross_entropy_per_row(self.model(rows), targets).mean())
        self.optimizer.step()
        self.schedule.step()
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        return stats

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(accuracy, mean loss) of the current (EMA if enabled) weights."""
        if y.numel() == 0:
            return float("nan"), float("nan")
        was_training = self.model.training
        self.model.eval()
        correct, total_loss = 0, 0.0
        ctx = self.ema.swapped() if self.ema is not None else contextlib.nullcontext()
        with ctx:
            for start in range(0, y.numel(), 1024):
                out = self.model(x[start : start + 1024])
                total_loss += float(cross_entropy_per_row(out, y[start : start + 1024]).sum())
                correct += int((out.argmax(1) == y[start : start + 1024]).sum())
        self.model.train(was_training)
        return correct / y.numel(), total_loss / y.numel()

    def _log_eval(self, wall: float, stats: dict[str, float]) -> dict[str, Any]:
        val_acc, val_loss = self.evaluate(self.x_val, self.y_val)
        test_acc, test_loss = self.evaluate(self.x_test, self.y_test)
        if not math.isfinite(test_loss):
            raise TrainingDiverged(
                f"step {self.step}: the test loss is {test_loss} (diverged); lower --lr. The last "
                f"good checkpoint in {str(self.out / CHECKPOINT)!r} is kept."
            )
        row = {
            "step": self.step,
            "epoch": self.step * self.cfg.batch_size / self.n,
            "epsilon": self.mechanism.epsilon() if self.mechanism else None,
            "val_accuracy": _finite_or_none(val_acc),
            "val_loss": _finite_or_none(val_loss),
            "test_accuracy": test_acc,
            "test_loss": test_loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "wall_seconds": round(wall, 3),
        }
        if "train_loss" in stats and self.cfg.log_train_loss:
            row["train_loss"] = stats["train_loss"]
        if self.dist.is_main:
            self.metrics.append(row)
        return row

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        start_time = time.perf_counter()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not (self.cfg.progress and self.dist.is_main),
            desc=f"{self.cfg.optimizer} on {self.cfg.dataset}",
            file=sys.stderr,
            dynamic_ncols=True,
        )
        last: dict[str, Any] = self.metrics.rows[-1] if self.metrics.rows else {}
        eps_every = max(1, self.total_steps // 20)  # ε costs ~0.2 s (PLD)
        eps_now = self.mechanism.epsilon() if self.mechanism and self.step else 0.0
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                with distributed.collective_errors(self.dist, f"step {self.step + 1}"):
                    stats = self._train_step()
                self.step_seconds += time.perf_counter() - t0
                self.steps_timed += 1
                wall = self.wall_before + time.perf_counter() - start_time
                if self.step % self.eval_every == 0 or self.step == self.total_steps:
                    last = self._log_eval(wall, stats)
                if self.step % self.checkpoint_every == 0 or self.step == self.total_steps:
                    self._save(wall)
                if self.mechanism and (self.step % eps_every == 0 or self.step == self.total_steps):
                    eps_now = self.mechanism.epsilon()
                postfix = {"test_loss": f"{last.get('test_loss', float('nan')):.3f}"}
                if "train_loss" in stats and (self.cfg.log_train_loss or not self.mechanism):
                    postfix["loss"] = f"{stats['train_loss']:.3f}"
                if self.mechanism:
                    postfix["ε"] = f"{eps_now:.3f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                if self.stop_after is not None and self.step >= self.stop_after:
                    return {"stopped_at": self.step}
            wall = self.wall_before + time.perf_counter() - start_time
            summary = self._summary(last, wall)
            if self.dist.is_main:
                (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
                plot_run(self.metrics.rows, self.out, f"{self.cfg.optimizer} · {self.cfg.dataset}")
            self.dist.barrier()
            return summary
        finally:
            bar.close()
            if self._owns_group:
                distributed.shutdown(self.dist)

    def _summary(self, last: dict[str, Any], wall: float) -> dict[str, Any]:
        n_params = sum(p.numel() for p in self.params)
        mech = self.mechanism
        return {
            "dataset": self.cfg.dataset,
            "model": self.cfg.model,
            "optimizer": self.cfg.optimizer,
            "private": mech is not None,
            "test_accuracy": last.get("test_accuracy"),
            "val_accuracy": last.get("val_accuracy"),
            "epsilon": mech.epsilon() if mech else None,
            "target_epsilon": self.cfg.epsilon if mech else None,
            "delta": self.cfg.delta if mech else None,
            "accountant": self.cfg.accountant if mech else None,
            # the per-example gradient engine actually used (--engine auto resolves here)
            "engine": getattr(mech.engine, "kind", type(mech.engine).__name__) if mech else None,
            "noise_multiplier": mech.noise_multiplier if mech else None,
            "sample_rate": mech.sample_rate if mech else self.cfg.batch_size / self.n,
            "batch_size": self.cfg.batch_size,
            "steps": self.total_steps,
            "epochs": self.total_steps * self.cfg.batch_size / self.n,
            "clip_norm": self.cfg.clip_norm if mech else None,
            "lr": self.cfg.lr,
            "lr_schedule": self.cfg.lr_schedule,
            "momentum": self.cfg.momentum,
            "density": self.cfg.density,
            "window_size": self.cfg.window_size,
            "augmult": self.cfg.augmult,
            "ema": self.cfg.ema,
            "seed": self.cfg.seed,
            "train_size": self.n,
            "val_size": int(self.y_val.numel()),
            "test_size": int(self.y_test.numel()),
            "parameters": n_params,
            "optimizer_state_bytes_per_param": state_bytes(self.optimizer) / max(1, n_params),
            "optimizer_state_bytes": state_bytes(self.optimizer),
            # measured in this process: after a resume, over the steps run since
            "seconds_per_step": self.step_seconds / self.steps_timed if self.steps_timed else None,
            "peak_memory_mb": _peak_memory_mb(self.device),
            "wall_seconds": round(wall, 2),
            "defaults_source": self.cfg.defaults_source,
            "out": str(self.out),
            "world_size": self.dist.world_size,
        }


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this run: CUDA's max allocated, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _default_out(cfg: TrainConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.dataset.replace(":", "_").replace("/", "_")
    return str(Path("runs") / f"{stamp}-{name}-{cfg.optimizer}-s{cfg.seed}")


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def model_for(cfg: TrainConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model a run with this config trains (same seeded initialization)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        return build_model(cfg.model, input_shape, num_classes)
