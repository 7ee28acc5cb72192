"""Worker for tests/test_packing.py: the optimizer steps of one fixed rollout batch on 1 or N ranks
with train.balance_batch (the pattern of tests/dist_update_worker.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_balance_worker.py ROLLOUT OUT key=value ...

Each rank takes the groups g with g % world == rank, runs `vppo.train.update`; rank 0 saves the step
losses, the updated weights and, per rank, every (mini-batch after balancing, TAS alpha) pair.
"""

import sys

import torch
import torch.distributed as dist

import vppo.train as vt
from vppo.config import load_config
from vppo.distributed import init_distributed
from vppo.loss import LossOptions
from vppo.model import build_engine, load_policy


def main() -> None:
    rollout_path, out_path, *overrides = sys.argv[1:]
    rank, world = init_distributed()
    cfg = load_config(None, overrides)
    blob = torch.load(rollout_path, weights_only=False)
    traj, ids = blob["batch"], blob["ids"]
    groups = torch.arange(len(traj)) // cfg.rollout.n
    traj = traj.select((groups % world == rank).nonzero().squeeze(-1))
    hf = load_policy(cfg)
    engine = build_engine(cfg, hf, world)
    shaped, real_shape = [], vt.shape

    def spy(c, mb):
        adv, alpha = real_shape(c, mb)
        shaped.append((mb, alpha))
        return adv, alpha

    vt.shape = spy
    steps = vt.update(engine, traj, cfg, LossOptions.from_config(cfg), ids, world)
    every = [None] * world
    dist.all_gather_object(every, shaped)
    state = {k: v.detach().clone() for k, v in engine.module.hf.state_dict().items()}
    if rank == 0:
        torch.save({"losses": [s["loss"] for s in steps], "state": state, "shaped": every}, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
