"""Data-parallel private training on ``torch.distributed`` (launched by ``torchrun``).

How one DP step runs on W ranks (every rank holds a full replica of model and optimizer):

1. Every rank holds the same :class:`~dpmicroadam.data.PoissonSampler` (same seed) and draws the
   same full Poisson batch ``I``; rank ``r`` keeps the contiguous chunk :func:`shard` ``(I, r, W)``.
   The chunks partition ``I``: no example is used twice or dropped, and drawing does not depend on
   W, so the sampler state is the single-process one on every rank.
2. Each rank clips and sums its chunk (``Σ_{i∈I_r} clip_C(g_i)``).
3. ``all_reduce(SUM)`` gives every rank the clipped sum over all of ``I`` (and the count, which the
   mechanism checks against ``|I|``).
4. Every rank adds the *same* Gaussian draw ``z ~ N(0, σ²C² I)``: the noise generators are seeded
   identically (``derive_seed(seed, "noise")``) and advance in lock step, so ``z`` is one draw
   added once to the global sum, not W independent draws. The release ``(Σ + z)/B`` is identical on
   every rank; the accountant records one event per step on every rank.
5. Every rank steps its optimizer on the identical gradient, so parameters and optimizer state stay
   identical; :func:`check_replicas_agree` verifies this with a checksum at each checkpoint.

Only rank 0 writes checkpoints, metrics and plots (after the others are done with the step); every
rank loads the same checkpoint on resume. ``secure_noise`` is refused: it reseeds from OS entropy on
each rank, so replicas would add different noise and diverge.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "RankFailure",
    "ReplicaDivergence",
    "setup",
    "shard",
    "check_replicas_agree",
    "collective_errors",
    "launched_by_torchrun",
]

DEFAULT_TIMEOUT_S = 600.0


class RankFailure(RuntimeError):
    """A collective failed or timed out: another rank probably died. Checkpoints are intact."""


class ReplicaDivergence(RuntimeError):
    """Ranks hold different parameters, optimizer state or settings."""


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job.

    Attributes:
        rank: Global rank r in [0, W).
        world_size: W, the number of data-parallel replicas.
        local_rank: Rank on this node (selects the GPU).
        group: The process group (None for a single process).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the one rank that writes files (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op for one process)."""
        if self.enabled:
            with collective_errors(self, "barrier"):
                dist.barrier(group=self.group)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (for values such as a time-stamped output folder)."""
        if not self.enabled:
            return obj
        box = [obj]
        with collective_errors(self, "broadcast"):
            dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def initialized() -> bool:
    """True when a default process group exists (the caller, or an earlier run, made it)."""
    return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    """True when the environment describes more than one rank (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "cpu", timeout_s: float | None = None) -> DistContext:
    """Join the process group described by torchrun's environment, if any.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (set by
    ``torchrun``). Without them (or with ``WORLD_SIZE=1``) returns the single-process context. If
    the default group is already initialized (the caller did it), it is used as is.

    Args:
        device: ``"cpu"`` uses the gloo backend; ``"cuda"`` uses NCCL and the GPU ``LOCAL_RANK``.
        timeout_s: How long a collective waits for a silent rank before failing (default 600 s,
            or the ``DPMICROADAM_DIST_TIMEOUT`` environment variable).

    Returns:
        The :class:`DistContext` of this process.

    Raises:
        ValueError: If the device is not cpu/cuda, or cuda is asked for without enough GPUs.
    """
    if dist.is_available() and dist.is_initialized():
        return _context(None)
    if not launched_by_torchrun():
        return DistContext()
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: distributed training runs on 'cpu' (gloo) or 'cuda'")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise ValueError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                "launch with --nproc_per_node no larger than the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
    if timeout_s is None:
        timeout_s = float(os.environ.get("DPMICROADAM_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    dist.init_process_group(
        backend="nccl" if kind == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return _context(None)


def _context(group: Any) -> DistContext:
    return DistContext(
        rank=dist.get_rank(group),
        world_size=dist.get_world_size(group),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        group=group if group is not None else dist.group.WORLD,
    )


def shard(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous chunk of the batch ``indices`` (split as evenly as possible).

    The W chunks partition ``indices`` in order (sizes differ by at most one; some may be
    empty), so concatenating them gives the batch back. Nothing is drawn: the sampler's state
    is untouched.

    Raises:
        ValueError: If ``world_size`` < 1 or ``rank`` is not in [0, world_size).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
    if world_size == 1:
        return indices
    return torch.tensor_split(indices, world_size)[rank]


def checksum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """float64 [Σx, Σx², Σ i·x] over all tensors: cheap, and sensitive to order and value."""
    out = torch.zeros(3, dtype=torch.float64)
    for t in tensors:
        x = t.detach().to("cpu", torch.float64).flatten()
        if x.numel():
            pos = torch.arange(1, x.numel() + 1, dtype=torch.float64)
            out += torch.stack([x.sum(), (x * x).sum(), (pos * x).sum()])
    return out


def state_tensors(*objs: Any) -> Iterator[torch.Tensor]:
    """Every tensor in nested dicts/lists (state_dicts), in a fixed order."""
    for obj in objs:
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                yield from state_tensors(obj[key])
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from state_tensors(v)


def check_replicas_agree(ctx: DistContext, what: str, tensors: Iterable[torch.Tensor]) -> None:
    """Raise on every rank if the ranks' ``tensors`` differ (compared by :func:`checksum`).

    Exact comparison: the replicas compute the same float operations on the same inputs, so
    any difference means they diverged (different seeds, configs or a bug).

    Raises:
        ReplicaDivergence: Naming ``what`` and the ranks that disagree with rank 0.
    """
    if not ctx.enabled:
        return
    local = checksum(tensors)
    device = _collective_device(ctx)
    gathered = [torch.zeros(3, dtype=torch.float64, device=device) for _ in range(ctx.world_size)]
    with collective_errors(ctx, f"checking that the ranks agree on {what}"):
        dist.all_gather(gathered, local.to(device), group=ctx.group)
    ref = gathered[0].cpu()
    bad = [r for r, g in enumerate(gathered) if not torch.equal(g.cpu(), ref)]
    if bad:
        raise ReplicaDivergence(
            f"rank(s) {bad} hold different {what} than rank 0: the data-parallel replicas "
            "diverged. Launch every rank with the same config and seed (no --secure-noise)."
        )


def fingerprint(value: Any) -> torch.Tensor:
    """A tensor checksum of a JSON-able value (a config), for :func:`check_replicas_agree`.

    Keys are sorted: dict order can differ between processes (sets iterate in hash order).
    """
    text = json.dumps(value, sort_keys=True, default=repr)
    digest = hashlib.sha256(text.encode()).digest()
    return torch.tensor([int.from_bytes(digest[i : i + 6], "little") for i in (0, 6, 12)]).double()


def _collective_device(ctx: DistContext) -> torch.device:
    if dist.get_backend(ctx.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextmanager
def collective_errors(ctx: DistContext, what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into :class:`RankFailure` with a clear message."""
    try:
        yield
    except (RankFailure, ReplicaDivergence):
        raise
    except (RuntimeError, dist.DistError) as err:
        if not _is_collective_error(err):
            raise  # e.g. out of memory: the rank's own error, not a lost peer
        raise RankFailure(
            f"rank {ctx.rank} of {ctx.world_size}: {what} failed ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Another rank has probably died or "
            "hung; the run is stopped. Only rank 0 writes checkpoints and it writes them "
            "atomically, so the last checkpoint is intact: fix the cause and rerun with --resume."
        ) from err


_COLLECTIVE_MARKERS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket")


def _is_collective_error(err: BaseException) -> bool:
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return any(marker in text for marker in _COLLECTIVE_MARKERS)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (no-op for one process)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
