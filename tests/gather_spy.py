"""The reward-function module of test_grpo_recipe's sharded runs: importing it (the recipe imports reward
functions before the process group and DeepSpeed's communication start) wraps torch.distributed's
all-gathers with a counter, and the GRPO rollouts' `whole_weights` and `sample` with the points it reads.
For every generation batch each rank appends to $GRPO_GATHERS how many all-gathers ran while the weights
were made whole and while completions were sampled token by token. The collectives still run: this counts,
it changes nothing the run computes."""

from __future__ import annotations

import contextlib
import json
import os

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from test_grpo_recipe import letter_e  # noqa: F401 - the job's reward, under the same name in the records

import recipes.core.train.rollouts as rollouts

GATHERS = (
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_gather_coalesced",
    "all_gather_single",
)
_count = [0]


def _counted(function):
    def counting(*args, **kwargs):
        _count[0] += 1
        return function(*args, **kwargs)

    return counting


for _name in GATHERS:
    if hasattr(c10d, _name):
        _wrapped = _counted(getattr(c10d, _name))
        setattr(c10d, _name, _wrapped)
        setattr(dist, _name, _wrapped)

_whole_weights, _sample = rollouts.whole_weights, rollouts.sample
_sampling: list[int] = []  # all-gathers during each sample() call of the open whole_weights


@contextlib.contextmanager
def _counting_whole_weights(accelerator, model):
    before = _count[0]
    _sampling.clear()
    with _whole_weights(accelerator, model) as whole:
        entered = _count[0] - before
        yield whole
    record = {"rank": dist.get_rank(), "entering": entered, "sampling": list(_sampling)}
    with open(os.environ["GRPO_GATHERS"], "a") as f:
        f.write(json.dumps(record) + "\n")


def _counting_sample(*args, **kwargs):
    before = _count[0]
    try:
        return _sample(*args, **kwargs)
    finally:
        _sampling.append(_count[0] - before)


rollouts.whole_weights, rollouts.sample = _counting_whole_weights, _counting_sample
