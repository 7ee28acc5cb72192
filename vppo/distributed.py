"""Process-group set-up and the few collectives the loop uses; ZeRO-3 parameter helpers.

A single process gets a one-rank gloo group, so the loop's code is the same on one CPU and on N GPUs.
"""

from __future__ import annotations

import contextlib
import os
import socket

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int]:
    """(rank, world size), initialising the process group once."""
    import deepspeed  # heavy (seconds): evaluation imports this module and never needs it
    import deepspeed.ops

    if "RANK" not in os.environ:
        with socket.socket() as sock:  # a free loopback port for the one-rank group
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
    if not torch.cuda.is_available():
        # On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op the first time a
        # process group is made (40-80 s on a fresh 2-core machine, every rank); gloo is enough here.
        # deepspeed.ops caches its compatibility table as one module-level dict, so the edit holds.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A reduced copy of `t` over all ranks (`t` itself with one rank); op: sum | min | max."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    t = t.clone()
    dist.all_reduce(t, op=ops[op])
    return t


def mean_over_ranks(values: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """The mean of `values` (at the positions `mask` keeps; all of them with None) over every rank's
    tensor together: one all-reduce of (sum, count) in float64; 0.0 when no rank has a position.
    A logged statistic is this, not the mean of per-rank means, so it does not depend on how the
    rows are dealt to ranks."""
    v = values.double() if mask is None else values.double()[mask.bool()]
    s = all_reduce(torch.stack([v.sum(), torch.tensor(float(v.numel()), dtype=torch.float64)]))
    return float(s[0] / s[1]) if s[1] > 0 else 0.0


def max_over_ranks(values: torch.Tensor, mask: torch.Tensor) -> float:
    """The max of `values` at the positions `mask` keeps, over every rank's tensor together (one
    all-reduce); -inf when no rank has a position."""
    top = torch.where(mask.bool(), values.double(), -torch.inf).max().reshape(1)
    return float(all_reduce(top, "max")[0])


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def zero3_partitioned(params) -> bool:
    """True when DeepSpeed ZeRO-3 partitions these parameters (outside their module's forward
    they are empty and must be gathered)."""
    return any(hasattr(p, "ds_id") for p in params)


def zero3_ranks(model) -> bool:
    """True when ZeRO-3 partitions the weights over several ranks: every forward gathers them
    collectively, so a rank whose rows all finished must keep stepping until every rank is done
    (transformers detects this only under its own DeepSpeed integration, which the loop does not use)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return zero3_partitioned(model.parameters())


def gathered(params: list):
    """Context giving the full parameters (ZeRO-3 partitions them outside their module's forward);
    a no-op when they are not partitioned."""
    if zero3_partitioned(params):
        import deepspeed  # present whenever parameters are partitioned

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()
