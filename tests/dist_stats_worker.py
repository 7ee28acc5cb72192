"""Worker for tests/test_update_stats.py: one training step of a fixed rollout batch on 1 or N ranks.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_stats_worker.py ROLLOUT OUT key=value ...

Each rank takes its shard of the groups (prompt groups g with g % world == rank, as
`vppo.sampling.sample_batch` deals them), `vppo.train.train_step` runs with `prepare` replaced by
that shard, and rank 0 saves the step's record and the per-optimizer-step statistics.
"""

import dataclasses
import sys

import torch
import torch.distributed as dist

import vppo.train as vt
from vppo.config import load_config


def main() -> None:
    rollout_path, out_path, *overrides = sys.argv[1:]
    run = vt.setup(load_config(None, overrides))
    blob = torch.load(rollout_path, weights_only=False)
    traj = blob["batch"]
    groups = torch.arange(len(traj)) // run.cfg.rollout.n
    shard = traj.select((groups % run.world == run.rank).nonzero().squeeze(-1))
    # each rank's own counters, as sample_batch reports them: its share of the batch's drops and
    # grader failures (one per row and per group of its shard here), so the logged totals are the
    # one-process totals only if the step sums them over ranks
    groups = len(shard) // run.cfg.rollout.n
    info = dataclasses.replace(
        blob["info"], dropped_groups=groups,
        grader={"grader/timeouts": len(shard), "grader/errors": 1, "grader/crashes": groups - 1},
    )  # fmt: skip
    vt.prepare = lambda run, step: (shard, info)
    seen, real = [], vt.update

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.extend(out)
        return out

    vt.update = spy
    rec = vt.train_step(run, 1)
    if run.rank == 0:
        torch.save({"record": rec, "steps": seen}, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
