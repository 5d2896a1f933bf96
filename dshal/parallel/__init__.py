"""Tensor and expert parallelism for the model core, as transforms over ``dshal.comm``.

    import dshal, dshal.comm
    from dshal import parallel

    dshal.use("dshal.yaml")
    dshal.comm.init()                                   # torchrun's environment
    groups = parallel.setup_groups(tp=2, ep=2)           # topology-aware placement
    model = parallel.from_pretrained_parallel("ckpt/", groups)   # each rank reads its slices
    # or transform a model you already have:
    parallel.tensor_parallel(model, groups.tp); parallel.expert_parallel(model, groups.ep)
"""

from __future__ import annotations

from dshal.parallel.groups import GroupPlan, ParallelGroups, plan_groups, setup_groups
from dshal.parallel.launch import LocalJob, free_port
from dshal.parallel.loading import ShardView, build_parallel, from_pretrained_parallel
from dshal.parallel.transforms import expert_parallel, tensor_parallel

__all__ = [
    "GroupPlan",
    "LocalJob",
    "ParallelGroups",
    "ShardView",
    "build_parallel",
    "expert_parallel",
    "free_port",
    "from_pretrained_parallel",
    "plan_groups",
    "setup_groups",
    "tensor_parallel",
]
