"""Data-parallel private training on torch.distributed: 2 gloo processes on CPU vs one process.

Sums over a different grouping of the examples (two shards, then all-reduce) round differently
from one long sum, so "equal to the one-process run" means equal to float tolerance; the ranks
among themselves must agree exactly.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import stats
from torch import nn

from dpmicroadam import distributed
from dpmicroadam.mechanism import DPConfig, DPMechanism
from dpmicroadam.optim import MicroAdam

N, B, STEPS = 48, 16.0, 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _model(kind: str) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "wide":  # 10 100 parameters: a tight estimate of the noise std
            return nn.Linear(100, 100)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g)


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, reduction="none")


def _zero_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out.sum(1) * 0.0  # every per-example gradient is exactly zero


def _train(sigma: float, group, rank: int, world: int) -> dict:
    """STEPS private MicroAdam steps; rank r passes its share of each Poisson batch."""
    model = _model("mlp")
    x, y = _data()
    cfg = DPConfig(
        dataset_size=N,
        expected_batch_size=B,
        clip_norm=0.5,
        noise_multiplier=sigma,
        target_delta=1e-3,
        noise_seed=7,
        physical_batch_size=3,  # shares split into unequal numbers of micro-batches
        engine="vmap",
    )
    mech = DPMechanism(cfg, model, _ce, process_group=group)
    opt = MicroAdam(model.parameters(), lr=1e-2, density=0.5, window_size=2)
    grads, sizes = [], []
    for _ in range(STEPS):
        idx = mech.sample()
        part = distributed.shard(idx, rank, world)
        out = mech.privatize(x[part], y[part])
        sizes.append(out["batch_size"])
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return {
        "grads": grads,
        "sizes": sizes,
        "params": [p.detach().clone() for p in model.parameters()],
        "opt": opt.state_dict(),
        "sampler": mech.sampler.state_dict(),
        "steps": mech.accountant.steps,
    }


def _noise(group) -> list[torch.Tensor]:
    model = _model("wide")
    cfg = DPConfig(
        dataset_size=N,
        expected_batch_size=B,
        clip_norm=1.5,
        noise_multiplier=2.0,
        target_delta=1e-3,
        noise_seed=11,
        engine="vmap",
    )
    mech = DPMechanism(cfg, model, _zero_loss, process_group=group)
    idx = mech.sample()
    rank, world = (dist.get_rank(), dist.get_world_size()) if group is not None else (0, 1)
    part = distributed.shard(idx, rank, world)
    mech.privatize(torch.randn(len(part), 100), torch.zeros(len(part), dtype=torch.long))
    return [p.grad.clone() for p in model.parameters()]


def _misuse(group) -> dict:
    out = {}
    x, y = _data()
    cfg = dict(
        dataset_size=N, expected_batch_size=B, clip_norm=1.0, target_delta=1e-3, noise_seed=1
    )
    try:
        DPMechanism(
            DPConfig(noise_multiplier=1.0, secure_noise=True, **{**cfg, "noise_seed": None}),
            _model("mlp"),
            _ce,
            process_group=group,
        )
    except ValueError as err:
        out["secure"] = str(err)
    mech = DPMechanism(
        DPConfig(noise_multiplier=1.0, **cfg), _model("mlp"), _ce, process_group=group
    )
    idx = mech.sample()
    try:  # forgot to shard: every rank passes the whole batch
        mech.privatize(x[idx], y[idx])
    except ValueError as err:
        out["unsharded"] = str(err)
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes share the CPU
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = dist.group.WORLD
        result = {
            "train0": _train(0.0, group, rank, world),
            "train1": _train(1.0, group, rank, world),
            "noise": _noise(group),
            "misuse": _misuse(group),
        }
    except Exception:  # pragma: no cover - shown by the test
        result = {"error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    # Leave without interpreter finalization: gloo's worker threads can still hold tensors then,
    # and freeing them during teardown sometimes aborts the process (SIGABRT, "terminate called
    # without an active exception"; seen twice here, pytorch/pytorch#179291), after its result is
    # written. The result file above is what the tests check.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn")
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in results:
        assert "error" not in r, r.get("error")
    return results


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("key, sigma", [("train0", 0.0), ("train1", 1.0)])
def test_two_ranks_equal_one_process(two_ranks, key, sigma):
    single = _train(sigma, None, 0, 1)
    for r in two_ranks:
        res = r[key]
        assert res["sizes"] == single["sizes"]  # all-reduced count = the whole Poisson batch
        for g2, g1 in zip(res["grads"], single["grads"], strict=True):
            _close(g2, g1)  # σ > 0: the same noise draw, added once
        _close(res["params"], single["params"])
        assert res["steps"] == STEPS  # one accountant event per step
        # sharding draws nothing: the sampler is where the one-process sampler is
        assert torch.equal(res["sampler"]["generator_state"], single["sampler"]["generator_state"])
    a, b = (r[key] for r in two_ranks)
    assert all(_equal(u, v) for u, v in zip(a["grads"], b["grads"]))
    assert _equal(a["params"], b["params"])
    sa = list(distributed.state_tensors(a["opt"]))
    sb = list(distributed.state_tensors(b["opt"]))
    assert sa and _equal(sa, sb)


def test_noise_std_is_sigma_c_over_b_added_once(two_ranks):
    expected = 2.0 * 1.5 / B
    g0, g1 = (torch.cat([t.flatten() for t in r["noise"]]) for r in two_ranks)
    assert torch.equal(g0, g1)
    single = torch.cat([t.flatten() for t in _noise(None)])
    torch.testing.assert_close(g0, single)  # the one-process noise draw, not W draws
    assert abs(float(g0.std()) / expected - 1) < 0.03
    z = g0.double().numpy()
    assert stats.kstest(z / expected, "norm").pvalue > 1e-3
    for wrong in (2 / 3, 3 / 2, math.sqrt(2)):  # √2: independent noise on each of 2 ranks
        assert stats.kstest(z / (wrong * expected), "norm").pvalue < 1e-6


def test_misuse_is_refused_on_every_rank(two_ranks):
    for r in two_ranks:
        assert "secure_noise" in r["misuse"]["secure"]
        assert "its share" in r["misuse"]["unsharded"]


def test_shard_partitions_the_batch():
    idx = torch.tensor([0, 3, 4, 9, 11, 12, 20])
    for world in (1, 2, 3, 8):
        parts = [distributed.shard(idx, r, world) for r in range(world)]
        assert torch.equal(torch.cat(parts), idx)
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    empty = torch.zeros(0, dtype=torch.long)
    assert distributed.shard(empty, 1, 2).numel() == 0
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="rank|world_size"):
            distributed.shard(idx, rank, world)


def test_single_process_context_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.enabled, ctx.is_main) == (0, 1, False, True)
    ctx.barrier()
    assert ctx.broadcast_object("x") == "x"
    distributed.check_replicas_agree(ctx, "nothing", [torch.ones(2)])


def test_checksum_sees_order_and_value():
    a = distributed.checksum([torch.tensor([1.0, 2.0])])
    assert not torch.equal(a, distributed.checksum([torch.tensor([2.0, 1.0])]))
    assert not torch.equal(a, distributed.checksum([torch.tensor([1.0, 2.0 + 1e-6])]))
    assert torch.equal(a, distributed.checksum([torch.tensor([1.0, 2.0])]))


# ---------------------------------------------------------------------- the training loop
RUN = dict(
    dataset="digits",
    model="mlp",
    optimizer="dp-microadam",
    steps=4,
    batch_size=64,
    noise_multiplier=1.0,
    checkpoint_every=2,
    eval_every=2,
    lr=1e-2,
    noise_seed=0,  # compared with a one-process run: the same noise and batches
    progress=False,
)


def _trainer_worker(rank: int, world: int, port: int, out: str, phase: str) -> None:
    from dpmicroadam.train import Run
    from dpmicroadam.train.config import resolve_config

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        DPMICROADAM_DIST_TIMEOUT="60",
    )
    torch.set_num_threads(1)
    result: dict = {}
    try:
        cfg = resolve_config({**RUN, "out": out, "resume": phase == "resume"})
        if phase == "die" and rank == 1:
            Run(cfg).fit(stop_at=2)
            os._exit(0)  # dies abruptly after step 2: no goodbye to rank 0
        Run(cfg).fit()
        result["finished"] = True
    except distributed.RankFailure as err:
        result["rank_failure"] = str(err)
    except Exception:  # pragma: no cover - shown by the test
        result["error"] = traceback.format_exc()
    torch.save(result, Path(out) / f"{phase}-rank{rank}.pt")


def _spawn_trainer(out: Path, phase: str) -> list[dict]:
    mp.start_processes(
        _trainer_worker, args=(2, free_port(), str(out), phase), nprocs=2, start_method="spawn"
    )
    return [torch.load(f, weights_only=False) for f in sorted(out.glob(f"{phase}-rank*.pt"))]


def _weights(out: Path) -> list[torch.Tensor]:
    from dpmicroadam.train.checkpoint import load_checkpoint

    state = load_checkpoint(out / "checkpoint.pt")
    return [state["model"][k] for k in sorted(state["model"])]


@pytest.mark.slow
def test_rank_death_stops_clearly_then_resume_matches_one_process(tmp_path, monkeypatch):
    from dpmicroadam.train import Run
    from dpmicroadam.train.checkpoint import load_checkpoint
    from dpmicroadam.train.config import resolve_config

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    Run(resolve_config({**RUN, "out": str(tmp_path / "one")})).fit()

    two = tmp_path / "two"
    two.mkdir()
    died = _spawn_trainer(two, "die")
    assert "finished" not in died[0] and "error" not in died[0], died[0]
    message = died[0]["rank_failure"]
    assert "rank 0 of 2" in message and "--resume" in message
    assert load_checkpoint(two / "checkpoint.pt")["step"] == 2  # intact, loadable
    assert not (two / "summary.json").exists()

    resumed = _spawn_trainer(two, "resume")
    assert all(r.get("finished") for r in resumed), resumed
    _close(_weights(two), _weights(tmp_path / "one"))
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]  # rank 0 alone wrote, no duplicates


@pytest.mark.slow
def test_torchrun_cli_matches_one_process(tmp_path, monkeypatch):
    from dpmicroadam.train import Run
    from dpmicroadam.train.config import resolve_config

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    Run(resolve_config({**RUN, "noise_multiplier": 0.0, "out": str(tmp_path / "one")})).fit()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "dpmicroadam", "train",
        "--dataset", "digits", "--model", "mlp", "--optimizer", "dp-microadam", "--steps", "4",
        "--batch-size", "64", "--noise-multiplier", "0", "--checkpoint-every", "2",
        "--eval-every", "2", "--lr", "0.01", "--no-progress", "--noise-seed", "0", "--out", str(tmp_path / "two"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _close(_weights(tmp_path / "two"), _weights(tmp_path / "one"))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2


def test_collective_errors_names_a_lost_peer_but_keeps_other_errors():
    ctx = distributed.DistContext(rank=0, world_size=2)
    lost = "[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"
    failure = pytest.raises(distributed.RankFailure, match=r"rank 0 of 2: step 3 failed.*--resume")
    with failure, distributed.collective_errors(ctx, "step 3"):
        raise RuntimeError(lost)
    oom = pytest.raises(RuntimeError, match="out of memory")
    with oom as info, distributed.collective_errors(ctx, "step 3"):
        raise RuntimeError("CUDA out of memory")
    assert not isinstance(info.value, distributed.RankFailure)
