"""Worker for tests/test_update_stats.py: one training step of a fixed rollout batch on 1 or N ranks.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_stats_worker.py ROLLOUT OUT key=value ...

Each rank takes its shard of the groups (prompt groups g with g % world == rank, as
`vppo.sampling.sample_batch` deals them), `vppo.train.train_step` runs with `prepare` replaced by
that shard, and rank 0 saves the step's record and the per-optimizer-step statistics.
"""

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
    vt.prepare = lambda run, step: (shard, blob["info"])
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
