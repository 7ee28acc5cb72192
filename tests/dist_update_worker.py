"""Worker for tests/test_train.py: the optimizer steps of one fixed rollout batch on 1 or N ranks.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_update_worker.py ROLLOUT OUT key=value ...

Each rank takes its shard of the groups (the rows `vppo.sampling.sample_batch` would have given it: prompt
groups g with g % world == rank, in order), runs `vppo.train.update` and rank 0 saves the global
step losses and the updated weights.
"""

import sys

import torch

from vppo.config import load_config
from vppo.distributed import init_distributed
from vppo.loss import LossOptions
from vppo.model import build_engine, load_policy
from vppo.train import update


def main() -> None:
    rollout_path, out_path, *overrides = sys.argv[1:]
    rank, world = init_distributed()
    cfg = load_config(None, overrides)
    blob = torch.load(rollout_path, weights_only=False)
    traj, ids = blob["batch"], blob["ids"]
    n = cfg.rollout.n
    groups = torch.arange(len(traj)) // n
    traj = traj.select((groups % world == rank).nonzero().squeeze(-1))
    hf = load_policy(cfg)
    engine = build_engine(cfg, hf, world)
    steps = update(engine, traj, cfg, LossOptions.from_config(cfg), ids, world)
    import deepspeed

    params = list(engine.module.parameters())
    zero3 = any(hasattr(p, "ds_id") for p in params)
    with deepspeed.zero.GatheredParameters(params) if zero3 else torch.no_grad():
        state = {k: v.detach().clone() for k, v in engine.module.hf.state_dict().items()}
    if rank == 0:
        torch.save({"losses": [s["loss"] for s in steps], "state": state}, out_path)
    # leave together: a rank exiting while the others still use the group aborts ("terminate called")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
