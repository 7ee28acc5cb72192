"""Worker for tests/test_train.py: the optimizer steps of one fixed rollout batch on 1 or N ranks.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_update_worker.py ROLLOUT OUT key=value ...

Each rank takes its shard of the groups (the rows `sample_rollout` would have given it: prompt
groups g with g % world == rank, in order), runs `vppo.train.update` and rank 0 saves the global
step losses and the updated weights.
"""

import sys

import torch

from vppo.config import load_config
from vppo.train import build_engine, init_distributed, load_policy, update


def main() -> None:
    rollout_path, out_path, *overrides = sys.argv[1:]
    rank, world = init_distributed()
    cfg = load_config(None, overrides)
    blob = torch.load(rollout_path, weights_only=False)
    ub, ids = blob["batch"], blob["ids"]
    n = cfg.rollout.n
    groups = torch.arange(len(ub.ro)) // n
    rows = (groups % world == rank).nonzero().squeeze(-1)
    ub.ro = ub.ro.select(rows)
    ub.old_logp, ub.advantages = ub.old_logp[rows], ub.advantages[rows]
    ub.dep_scores = None if ub.dep_scores is None else ub.dep_scores[rows]
    ub.token_mask = None if ub.token_mask is None else ub.token_mask[rows]
    hf = load_policy(cfg)
    engine = build_engine(cfg, hf, world)
    steps = update(engine, cfg, ub, world, ids)
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
