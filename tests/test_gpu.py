"""GPU checks (marked ``gpu``; the default run skips them): run ``bash benchmarks/gpu_check.sh``
on a CUDA machine. Each compares the CUDA path with the CPU reference of the same code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

sys.path.insert(0, str(Path(__file__).resolve().parent))


def test_microadam_on_cuda_matches_cpu():
    from dpmicroadam.optim import MicroAdam

    gen = torch.Generator().manual_seed(0)
    shapes = [(300, 70), (5000,), (17,), (64, 3, 3, 3)]
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [
        [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(12)
    ]
    finals = {}
    for device in ("cpu", "cuda"):
        for ef_bits in (None, 4):
            params = [t.to(device).clone().requires_grad_() for t in init]
            opt = MicroAdam(params, lr=1e-2, density=0.05, window_size=4, ef_bits=ef_bits)
            for step in grads:
                for p, g in zip(params, step, strict=True):
                    p.grad = g.to(device)
                opt.step()
            finals[device, ef_bits] = [p.detach().cpu() for p in params]
    for ef_bits in (None, 4):
        for a, b in zip(finals["cpu", ef_bits], finals["cuda", ef_bits], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_seeded_resume_with_device_noise_matches_the_uninterrupted_run(tmp_path):
    from dpmicroadam.train import Run, resolve_config
    from dpmicroadam.train.checkpoint import load_checkpoint

    settings = dict(dataset="digits", optimizer="dp-sgd", lr=0.5, steps=8, batch_size=64,
                    device="cuda", noise_seed=3, checkpoint_every=4, progress=False)  # fmt: skip
    Run(resolve_config({**settings, "out": str(tmp_path / "full")})).fit()
    Run(resolve_config({**settings, "out": str(tmp_path / "cut")})).fit(stop_at=6)
    Run(resolve_config({**settings, "out": str(tmp_path / "cut"), "resume": True})).fit()
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    cut = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    for key in full["model"]:
        torch.testing.assert_close(full["model"][key], cut["model"][key], rtol=1e-6, atol=1e-7)
    noise = full["mechanism"]["gradient"]["noise"]
    assert "cuda:0" in noise["device_states"]  # drawn on the device, its generator checkpointed


def test_fast_engine_on_cuda_matches_vmap():
    from dpmicroadam.privacy import VmapEngine
    from dpmicroadam.privacy.fast import FastEngine
    from privacy_models import MLP, GroupNormCNN, per_row_ce

    torch.manual_seed(0)
    for model, x in (
        (MLP().double(), torch.randn(9, 6, dtype=torch.float64)),
        (GroupNormCNN().double(), torch.randn(9, 2, 8, 8, dtype=torch.float64)),
    ):
        model = model.cuda()
        x, y = x.cuda(), torch.randint(0, 3, (9,)).cuda()
        fast_sums, fast_norms = FastEngine(model, per_row_ce).clipped_sum(x, y, 0.5)
        ref_sums, ref_norms = VmapEngine(model, per_row_ce).clipped_sum(x, y, 0.5)
        torch.testing.assert_close(fast_norms, ref_norms, rtol=1e-10, atol=1e-12)
        for a, b in zip(fast_sums, ref_sums, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_cifar_recipe_20_steps_on_fake_data(tmp_path, capsys):
    from dpmicroadam.cli import main
    from test_recipe_cifar import write_fake_cifar10

    write_fake_cifar10(tmp_path, per_batch=200)
    argv = ["train", "--recipe", "cifar10-wrn16-4", "--data-dir", str(tmp_path), "--device",
            "cuda", "--batch-size", "256", "--steps", "20", "--augmult", "4",
            "--physical-batch-size", "64", "--eval-every", "10", "--json", "--out",
            str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 20 and summary["epsilon"] <= 8.0
    assert summary["engine"] == "fast" and summary["peak_memory_mb"] > 0
    assert summary["optimizer_state_bytes_per_param"] < 0.95


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_process_nccl_run_matches_one_process(tmp_path):
    from test_distributed import free_port

    args = ["--dataset", "digits", "--model", "mlp", "--optimizer", "dp-microadam", "--steps",
            "6", "--batch-size", "64", "--noise-multiplier", "1.0", "--noise-seed", "0",
            "--lr", "0.01", "--no-progress", "--json", "--device", "cuda"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(free_port()), "-m", "dpmicroadam", "train", *args, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run(
        [sys.executable, "-m", "dpmicroadam", "train", *args, "--out", str(tmp_path / "one")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = json.loads(two.stdout.strip().splitlines()[-1]), json.loads(one.stdout)
    assert a["world_size"] == 2 and a["epsilon"] == b["epsilon"]
    assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 0.02  # NCCL sums in another order
