"""Helpers for data-parallel training with ``torch.distributed`` (DDP, launched by torchrun).

* :func:`init_from_env` creates the default process group from the variables torchrun sets
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) or, in a
  multi-task Slurm job (the submitit launcher), from ``SLURM_PROCID`` / ``SLURM_NTASKS`` /
  ``SLURM_LOCALID``; backend ``gloo`` on CPU, ``cpu:gloo,cuda:nccl`` when CUDA is available.
* :func:`rank`, :func:`world_size`, :func:`is_main_process` work with or without a group
  (one process: rank 0 of 1).
* Collective timeout: a rank that stalls makes the others fail after
  ``trainer.ddp.timeout_s`` seconds (:func:`ddp_timeout_s`, default
  :data:`DEFAULT_TIMEOUT_S`) instead of torch's 30 minutes; :func:`set_timeout` applies it
  to a group created before the config was known (torchrun, see ``docs/runs.md``).
* :func:`shard_indices`: rank ``r``'s part of an epoch order, the same samples and batches
  as ``DistributedSampler(drop_last=True)`` + a per-rank ``batch_size``.
* :func:`all_gather_cat`: concatenation over ranks of tensors whose first dimension may
  differ from rank to rank; the local slice of the result is the input itself, so gradients
  flow to the local part (the other ranks' parts are constants).
* :func:`check_parameters_in_sync`: sum and sum of squares of every parameter in float64,
  compared through a MAX and a MIN all-reduce; raises :class:`ParameterMismatchError`
  (on every rank) when ranks disagree.
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lsm_train.capture import unwrap_model as unwrap  # the module inside DDP / compile

__all__ = [
    "ParameterMismatchError",
    "DEFAULT_TIMEOUT_S",
    "ddp_timeout_s",
    "set_timeout",
    "env_world_size",
    "init_from_env",
    "is_initialized",
    "rank",
    "world_size",
    "local_rank",
    "is_main_process",
    "barrier",
    "shard_indices",
    "all_gather_cat",
    "all_reduce_sum",
    "broadcast_int",
    "broadcast_str",
    "parameter_checksums",
    "check_parameters_in_sync",
    "unwrap",
]


class ParameterMismatchError(RuntimeError):
    """Model parameters differ across ranks (DDP replicas went out of sync)."""


DEFAULT_TIMEOUT_S = 600.0  # well above a checkpoint write or a rank-0 monitor pass


def ddp_timeout_s(configured: Any = None) -> float:
    """The collective timeout in seconds: ``configured`` (``trainer.ddp.timeout_s``), or
    :data:`DEFAULT_TIMEOUT_S` when None. ValueError unless a finite number > 0."""
    if configured is None:
        return DEFAULT_TIMEOUT_S
    ok = isinstance(configured, (int, float)) and not isinstance(configured, bool)
    if not ok or not 0 < configured < float("inf"):
        raise ValueError(
            f"trainer.ddp.timeout_s: expected a number of seconds > 0, got {configured!r}"
        )
    return float(configured)


def set_timeout(seconds: float) -> None:
    """Set the timeout of the default group's collectives (gloo and NCCL)."""
    if not is_initialized():
        return
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(datetime.timedelta(seconds=float(seconds)))


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def is_initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def rank(group: Any = None) -> int:
    return _dist().get_rank(group) if is_initialized() else 0


def world_size(group: Any = None) -> int:
    return _dist().get_world_size(group) if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def is_main_process() -> bool:
    """True on rank 0 (and in a plain, non-distributed process)."""
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        _dist().barrier()


def env_world_size() -> int:
    """The world size the launcher announced (torchrun ``WORLD_SIZE``, Slurm ``SLURM_NTASKS``
    inside an ``srun`` step), 1 when none."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ:
        return int(os.environ.get("SLURM_NTASKS", 1))
    return 1


def _export_slurm_env() -> None:
    """Set torchrun's variables from Slurm's (a task of a multi-task submitit job)."""
    try:  # submitit knows the master node and a free port of the job
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return
    except Exception:  # noqa: BLE001 - fall back to the plain Slurm variables
        pass
    os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
    os.environ.setdefault("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    job = int(os.environ.get("SLURM_JOB_ID", 0))
    os.environ.setdefault("MASTER_PORT", str(20000 + job % 20000))


def default_backend() -> str:
    """``LSM_TRAIN_DIST_BACKEND`` if set, else ``cpu:gloo,cuda:nccl`` with CUDA, ``gloo``."""
    env = os.environ.get("LSM_TRAIN_DIST_BACKEND")
    if env:
        return env
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Create the default process group from the launcher's environment (idempotent).

    Returns True when this call created the group (the caller should destroy it at the
    end), False when it already existed or the process runs alone (world size 1).
    With CUDA, the current device becomes ``cuda:LOCAL_RANK``. ``timeout_s``: the
    collective timeout, :func:`ddp_timeout_s` when None.
    """
    if is_initialized():
        return False
    if env_world_size() <= 1:
        return False
    if "RANK" not in os.environ:
        _export_slurm_env()
    dist = _dist()
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    dist.init_process_group(
        backend=backend or default_backend(),
        init_method="env://",
        timeout=datetime.timedelta(seconds=ddp_timeout_s(timeout_s)),
    )
    return True


def destroy() -> None:
    """Tear the default group down after a barrier: a rank that destroys its group while a
    peer's last message is still in flight can abort at exit (gloo's worker threads). A
    garbage collection first frees unreachable holders of the group (a DDP reducer in a
    reference cycle), so the group is not finalized during interpreter shutdown."""
    if is_initialized():
        gc.collect()
        dist = _dist()
        try:
            dist.barrier()
        except RuntimeError:  # a peer is gone already: nothing left to wait for
            pass
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ data


def shard_indices(order: torch.Tensor, rank_: int, world: int) -> torch.Tensor:
    """Rank ``rank_``'s share of the sample order ``order``: ``order[rank_ : W*(n//W) : W]``.

    As ``DistributedSampler(drop_last=True)``: every rank gets ``n // W`` samples (the
    tail is dropped so that all ranks run the same number of steps); batch ``b`` of size
    ``B`` on every rank together is the global block ``order[b*B*W : (b+1)*B*W]``.
    """
    if world < 1 or not 0 <= rank_ < world:
        raise ValueError(f"shard_indices: expected 0 <= rank < world, got {rank_} of {world}")
    n = (order.shape[0] // world) * world
    return order[rank_:n:world]


# ------------------------------------------------------------------------- collectives


class _GatherCat(torch.autograd.Function):
    """cat over ranks; backward returns the gradient of the local slice only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, interleave: bool) -> torch.Tensor:
        dist = _dist()
        w = dist.get_world_size(group)
        r = dist.get_rank(group)
        size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
        sizes = [torch.zeros_like(size) for _ in range(w)]
        dist.all_gather(sizes, size, group=group)
        counts = [int(s.item()) for s in sizes]
        m = max(counts)
        pad = x.new_zeros((m, *x.shape[1:]))
        pad[: x.shape[0]] = x.detach()
        parts = [torch.empty_like(pad) for _ in range(w)]
        dist.all_gather(parts, pad.contiguous(), group=group)
        ctx.interleave = (w, r) if interleave and len(set(counts)) == 1 else None
        if ctx.interleave is not None:  # row i*W + k = rank k's row i
            return torch.stack(parts, dim=1).reshape(w * m, *x.shape[1:])
        parts = [p[:c] for p, c in zip(parts, counts, strict=True)]
        start = sum(counts[:r])
        ctx.bounds = (start, start + counts[r])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.interleave is not None:
            w, r = ctx.interleave
            return grad.reshape(-1, w, *grad.shape[1:])[:, r], None, None
        a, b = ctx.bounds
        return grad[a:b], None, None


def all_gather_cat(x: torch.Tensor, group: Any = None, *, interleave: bool = False) -> torch.Tensor:
    """Concatenate ``x`` (shape ``(n_r, ...)``, ``n_r`` may differ by rank) over the ranks of
    ``group`` in rank order. Differentiable: the gradient reaches the local ``x`` only.
    Without a process group (or a world of 1) returns ``x``.

    ``interleave=True`` with equal sizes on every rank orders the rows ``r0[0], r1[0], ...,
    r0[1], r1[1], ...``: the inverse of strided sharding (``shard_indices`` /
    ``DistributedSampler``), so the result is the global batch in its original order.
    With unequal sizes the rank order is kept.

    Cost: one all-gather of the sizes, one of ``max_r n_r`` rows per rank (padding).
    """
    if not is_initialized() or world_size(group) == 1:
        return x
    if x.ndim == 0:
        raise ValueError("all_gather_cat: expected a tensor with a batch dimension, got a scalar")
    return _GatherCat.apply(x.contiguous(), group, bool(interleave))


def all_reduce_sum(values: Iterable[float], device: Any = "cpu", group: Any = None) -> list[float]:
    """Sum of a few numbers over ranks (float64); the numbers themselves without a group."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if is_initialized():
        _dist().all_reduce(t, group=group)
    return t.cpu().tolist()


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank ``src``'s ``value`` on every rank (a CPU tensor: works with gloo)."""
    if not is_initialized():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long)
    _dist().broadcast(t, src)
    return int(t.item())


def broadcast_str(text: str, src: int = 0) -> str:
    """Rank ``src``'s string on every rank."""
    if not is_initialized():
        return text
    data = text.encode("utf-8")
    n = broadcast_int(len(data), src)
    if n == 0:
        return ""
    t = torch.zeros(n, dtype=torch.uint8)
    if rank() == src:
        t[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    _dist().broadcast(t, src)
    return bytes(t.tolist()).decode("utf-8")


# ------------------------------------------------------------------------ parameters


def parameter_checksums(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    """Names and a ``(P, 2)`` float64 CPU tensor: sum and sum of squares of each parameter."""
    names, rows = [], []
    for name, p in unwrap(model).named_parameters():
        v = p.detach().to(torch.float64)
        rows.append(torch.stack([v.sum(), (v * v).sum()]).cpu())
        names.append(name)
    if not rows:
        return names, torch.zeros((0, 2), dtype=torch.float64)
    return names, torch.stack(rows)


def check_parameters_in_sync(
    model: nn.Module, *, rtol: float = 1e-9, group: Any = None
) -> float:
    """Verify that every rank holds the same parameters; return the largest spread.

    Per parameter tensor, the sum and the sum of squares (float64) are all-reduced with MAX
    and with MIN; the ranks agree when ``max - min <= rtol * max(1, |max|)`` everywhere.
    Otherwise :class:`ParameterMismatchError` is raised on every rank (they all see the same
    reductions), naming the parameters that differ. Without a process group returns 0.
    Cost: two all-reduces of 2 numbers per parameter tensor.
    """
    names, sums = parameter_checksums(model)
    if not is_initialized() or world_size(group) == 1:
        return 0.0
    dist = _dist()
    device = "cpu"
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    hi = sums.to(device).clone()
    lo = sums.to(device).clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    hi, lo = hi.cpu(), lo.cpu()
    spread = hi - lo
    bad_mask = (spread > rtol * hi.abs().clamp(min=1.0)).any(dim=1) | ~torch.isfinite(spread).all(1)
    worst = float(spread.max()) if spread.numel() else 0.0
    if bool(bad_mask.any()):
        bad = [names[i] for i in torch.nonzero(bad_mask).flatten().tolist()]
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ParameterMismatchError(
            f"parameters differ across the {world_size(group)} ranks: {shown} "
            f"(largest spread of sum / sum of squares: {worst:.3g}); the replicas went out "
            "of sync (a rank skipped a step or an optimizer update was not identical)"
        )
    return worst
