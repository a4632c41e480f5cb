"""The run API (hooks, state), the generated flag table and the layering promises."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from dpmicroadam.cli import build_parser, config_flags
from dpmicroadam.train import Run, RunHooks, resolve_config
from dpmicroadam.train.config import TrainConfig

FAST = dict(dataset="digits", steps=6, batch_size=64, eval_every=3, progress=False)


class Recorder(RunHooks):
    def __init__(self):
        self.calls: list[str] = []

    def started(self, run):
        self.calls.append("started")

    def before_release(self, run):
        assert run.mechanism is not None
        self.calls.append("before")

    def after_release(self, run):
        # p.grad holds the released gradient here, before the optimizer steps
        assert all(p.grad is not None for p in run.params)
        self.calls.append("after")

    def summary(self, run, summary):
        summary["recorded"] = len(self.calls)


def test_hooks_are_called_around_each_release(tmp_path):
    hooks = Recorder()
    run = Run(resolve_config({**FAST, "out": str(tmp_path / "r")}), hooks)
    assert hooks.calls == ["started"]
    stats = run.step()
    assert hooks.calls == ["started", "before", "after"] and "batch_size" in stats
    summary = run.fit()
    assert hooks.calls == ["started"] + ["before", "after"] * 6
    assert summary["recorded"] == 13 and summary["steps"] == 6


def test_run_state_round_trips(tmp_path):
    run = Run(resolve_config({**FAST, "out": str(tmp_path / "a")}))
    run.step()
    state = run.state.state_dict()
    other = Run(resolve_config({**FAST, "out": str(tmp_path / "b")}))
    other.state.load_state_dict(state)
    assert other.state.step == 1
    run.step()
    other.step()
    for a, b in zip(run.model.parameters(), other.model.parameters(), strict=True):
        assert torch.equal(a, b)  # same model, optimizer, sampler, noise and accountant
    assert run.epsilon() == other.epsilon()
    with pytest.raises(ValueError, match="lacks"):
        other.state.load_state_dict({k: v for k, v in state.items() if k != "mechanism"})


def test_density_head_makes_the_head_its_own_group(tmp_path):
    cfg = resolve_config({**FAST, "out": str(tmp_path / "h"), "density_head": 1.0})
    run = Run(cfg)
    groups = run.optimizer.param_groups
    assert [g["density"] for g in groups] == [0.01, 1.0]
    head = dict(run.model.named_parameters())
    last = [n for n in head if n.startswith(max(n.rsplit(".", 1)[0] for n in head))]
    assert {id(p) for p in groups[1]["params"]} == {id(head[n]) for n in last}
    with pytest.raises(ValueError, match="--density-head must be in"):
        resolve_config({**FAST, "density_head": 0.0})


def test_importing_the_training_layer_does_not_import_matplotlib():
    code = (
        "import sys, dpmicroadam.train, dpmicroadam.mechanism, dpmicroadam.finetune, "
        "dpmicroadam.audit; print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("command", ["train", "finetune", "audit"])
def test_every_help_lists_every_setting_and_no_positionals(command, capsys):
    from dpmicroadam.audit.config import AuditConfig
    from dpmicroadam.finetune.config import FinetuneConfig

    cls = {"train": TrainConfig, "finetune": FinetuneConfig, "audit": AuditConfig}[command]
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    flags = config_flags(cls)
    skipped = {
        "finetune": set(FinetuneConfig.NOT_FOR_FINETUNE),
        "audit": set(AuditConfig.NOT_FOR_AUDIT),
    }.get(command, set())
    for flag, name, kw in flags:
        if name in skipped:
            assert flag not in text.split(), (command, flag)
            continue
        assert flag in text, (command, flag)
        assert kw["help"], (command, flag)  # every flag says what it does
    names = {f.name for f in dataclasses.fields(cls)} - {"defaults_source"}
    assert names == {name for _, name, _ in flags}  # the table covers every field
    assert "positional arguments" not in text  # no stray positionals


def test_train_help_has_model_and_recipe_as_flags():
    parser = build_parser()
    args = parser.parse_args(["train", "--model", "cnn", "--recipe", "cifar10-wrn16-4"])
    assert args.model == "cnn" and args.recipe == "cifar10-wrn16-4"


def test_audit_refuses_torchrun(tmp_path, monkeypatch):
    from dpmicroadam.audit import Auditor, resolve_audit_config

    cfg = resolve_audit_config({**FAST, "optimizer": "dp-sgd", "out": str(tmp_path / "a")})
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one process"):
        Auditor(cfg)


def test_mixed_type_flags_parse_as_text(tmp_path):
    args = build_parser().parse_args(["train", "--ef-bits", "none", "--topk-block", "whole"])
    assert args.ef_bits == "none" and args.topk_block == "whole"
    cfg = resolve_config({"ef_bits": args.ef_bits, "topk_block": args.topk_block})
    assert cfg.ef_bits is None


@pytest.mark.parametrize("optimizer", ["dp-adam", "dp-microadam"])
def test_adam_eps_as_a_multiple_of_the_noise_std(tmp_path, optimizer):
    cfg = resolve_config({**FAST, "optimizer": optimizer, "adam_eps_noise": 2.0,
                          "out": str(tmp_path / optimizer)})  # fmt: skip
    run = Run(cfg)
    for group in run.optimizer.param_groups:
        assert group["eps"] == pytest.approx(2.0 * run.mechanism.noise_std)
    zero = Run(resolve_config({**FAST, "optimizer": optimizer, "adam_eps_noise": 0.0,
                               "out": str(tmp_path / f"{optimizer}0")}))  # fmt: skip
    assert {g["eps"] for g in zero.optimizer.param_groups} == {1e-8}
    with pytest.raises(ValueError, match="needs a private optimizer"):
        resolve_config({"optimizer": "adam", "adam_eps_noise": 1.0})


def test_cnn_width_multiplier():
    from dpmicroadam.models import build_model

    sizes = [
        sum(p.numel() for p in build_model("cnn", (1, 28, 28), 10, width=w).parameters())
        for w in (1, 2, 4)
    ]
    assert sizes[0] == 26010 and sizes[0] < sizes[1] < sizes[2]
    with pytest.raises(ValueError, match="--width 2 applies to --model cnn only"):
        resolve_config({"model": "mlp", "width": 2})


def test_fashion_mnist_microadam_default_eps_is_noise_relative():
    # the eps scan's winner is the tuned default, and it never overrides the user's own eps
    cfg = resolve_config({"dataset": "fashion-mnist", "optimizer": "dp-microadam"})
    assert cfg.adam_eps_noise == 3.0 and cfg.lr == 1e-2 and cfg.density == 0.01
    assert "eps scan" in cfg.defaults_source["adam_eps_noise"]
    own = resolve_config(
        {"dataset": "fashion-mnist", "optimizer": "dp-microadam", "adam_eps": 1e-6}
    )
    assert own.adam_eps_noise is None and own.adam_eps == 1e-6
    assert "adam_eps_noise" not in own.defaults_source
    # DP-Adam keeps its default eps: the scan found no gain there
    assert (
        resolve_config({"dataset": "fashion-mnist", "optimizer": "dp-adam"}).adam_eps_noise is None
    )


def test_image_layout_is_channels_last_with_the_same_values():
    from dpmicroadam.train.task import image_layout

    for shape in [(5, 1, 6, 7), (4, 3, 5, 5), (2, 3, 1, 4, 4), (2, 2, 3, 4, 5)]:
        x = torch.randn(shape)
        assert x.stride(-3) != 1  # NCHW strides, even with one channel
        y = image_layout(x)
        assert y.stride(-3) == 1
        if y.dim() == 4:
            assert y.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y, x)
        assert image_layout(y) is y  # already channels-last: untouched
    for other in [torch.randn(5, 7), torch.randint(0, 9, (2, 3, 4, 4)), torch.randn(2, 3, 4)]:
        assert image_layout(other) is other


@pytest.mark.parametrize("augmult", [1, 2])
def test_run_holds_and_steps_image_batches_channels_last(tmp_path, augmult):
    """(N, H, W) arrays load with NCHW strides; the run holds them (and augmented views)
    channels-last, so the convolutions and pooling run their fast CPU kernels."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(300, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, size=300)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x[:240], y_train=y[:240], x_test=x[240:], y_test=y[240:])
    cfg = {**FAST, "dataset": f"npz:{path}", "model": "cnn", "batch_size": 32, "steps": 1}
    run = Run(resolve_config({**cfg, "augmult": augmult, "out": str(tmp_path / "r")}))
    for held in (run.x_train, run.x_val, run.x_test):
        assert held.stride(1) == 1
    assert run.x_train is run.task.x_train  # converted once, not held twice
    batch, _ = run._batch()
    assert batch.stride(-3) == 1 and batch.shape[-3:] == (1, 28, 28)
    # The values are untouched: the same images as loaded, whatever the split.
    held = torch.cat([run.x_train, run.x_val]).flatten().sort().values
    loaded = torch.from_numpy(x[:240]).flatten().double().div(255).sort().values
    torch.testing.assert_close(held.double(), loaded, rtol=0, atol=1e-7)


def test_a_task_of_its_own_keeps_its_layout(tmp_path):
    """Only `train`'s own task is made channels-last: a model of a custom task may ``view``."""
    from dpmicroadam.train.task import Task

    class Viewing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.head = torch.nn.Linear(4 * 6 * 6, 10)

        def forward(self, x):
            h = self.conv(x)
            return self.head(h.view(h.shape[0], -1))  # needs contiguous (NCHW) activations

    class Own(RunHooks):
        def build_task(self, run):
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn(96, 3, 8, 8, generator=g), torch.randint(0, 10, (96,), generator=g)
            return Task(x[:64], y[:64], x[64:80], y[64:80], x[80:], y[80:], Viewing())

    run = Run(resolve_config({**FAST, "batch_size": 16, "out": str(tmp_path / "o")}), Own())
    assert run.x_train.is_contiguous() and run.x_train.stride(1) == 64
    run.fit()  # the model's view works on what it is given
