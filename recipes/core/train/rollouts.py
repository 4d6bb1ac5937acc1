"""GRPO's generation batches: which prompts, which completions each rank samples and trains, their rewards
and advantages, and the micro-batches a rank trains on them.

What decides the samples: completion c of generation batch n (generation c % num_generations of the
batch's prompt c // num_generations) is drawn from a generator seeded from (seed, n, c) alone
(core/model/generation.py), by the rank that trains it (core/plan/grpo.py micro_batch_completions). The
prompts of an epoch are the train set in an order drawn from (seed, epoch), cut into generation batches of
prompts_per_generation_batch. So the completions depend on the seed, the position in the run and the
weights at generation time only: 1 process and N processes with the same global batch sample the same
completions, and a resumed run the same ones as an uninterrupted run.

Each rank scores its own completions with the reward functions; the scores are then joined over the ranks,
so every rank holds the whole generation batch (completions, rewards, group-relative advantages) and
computes each step's loss divisor and records without further communication. The importance ratio's
logp_old (when a completion is trained after the weights have moved: num_iterations > 1, or more
optimizer steps per generation batch than one) and the reference's log-probabilities (beta > 0) are
computed once per generation batch by the rank that trains the completion, and joined too. The whole
generation batch is a tracked object of the checkpoint, so a run resumed in the middle of one trains on
exactly the completions it was sampling from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from recipes.core.data.prompts import IDS
from recipes.core.distributed.gather import whole_weights
from recipes.core.distributed.ranks import Ranks
from recipes.core.errors import USER_ERRORS, StoppedWithMainProcess
from recipes.core.losses.grpo import group_advantages
from recipes.core.losses.rewards import RewardFunction, score, total_rewards
from recipes.core.model.generation import Sampling, sample
from recipes.core.plan.grpo import GRPOPlan, micro_batch_completions


@dataclasses.dataclass(frozen=True)
class MicroBatchRef:
    """Micro-batch `position` (of steps_per_generation) of pass `iteration` over generation batch `batch`
    of its epoch."""

    batch: int
    iteration: int
    position: int


class _Schedule(DataLoader):
    """The micro-batches of an epoch as the training loop's loader: every rank runs the same sequence, so it
    is not sharded; the epoch's order of prompts is the generation batches' business."""

    def set_epoch(self, epoch: int) -> None:
        pass


def micro_batch_schedule(plan: GRPOPlan) -> DataLoader:
    """One epoch's micro-batches, in training order: each generation batch's passes in turn."""
    refs = [
        MicroBatchRef(batch, iteration, position)
        for batch in range(plan.generation_batches_per_epoch)
        for iteration in range(plan.num_iterations)
        for position in range(plan.steps_per_generation)
    ]
    return _Schedule(refs, batch_size=1, collate_fn=lambda items: items[0])


def completion_seed(seed: int, batch: int, completion: int) -> int:
    """The seed completion `completion` of generation batch `batch` (over the run) is sampled with."""
    return int(np.random.SeedSequence([seed, batch, completion]).generate_state(1)[0])


def epoch_order(seed: int, epoch: int, num_prompts: int) -> np.ndarray:
    """The train-set rows in the order an epoch cuts into generation batches."""
    return np.random.default_rng([seed, epoch]).permutation(num_prompts)


@dataclasses.dataclass
class GenerationBatch:
    """One generation batch, identical on every rank. Completion c is generation c % G of prompt c // G."""

    index: int  # over the run
    prompt_rows: list[int]  # train-set row of each prompt
    ids: list[list[int]]
    truncated: list[bool]
    rewards: torch.Tensor  # [reward functions, completions], NaN where a function gave None
    total: torch.Tensor  # [completions], the weighted sum
    advantages: torch.Tensor  # [completions]
    old_logps: dict[int, torch.Tensor]  # by completion, where needed
    ref_logps: dict[int, torch.Tensor]
    sampling_time: float  # seconds the slowest rank sampled for
    generation_time: float = 0.0  # seconds on sampling, scoring and the logp passes (slowest rank)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> GenerationBatch:
        return cls(**state)


@dataclasses.dataclass
class Rollouts:
    """The generation batch in use, built when a micro-batch of another one comes up; a tracked object of
    the checkpoint (state_dict / load_state_dict)."""

    plan: GRPOPlan
    ranks: Ranks
    seed: int
    train_set: Any
    rewards: Sequence[RewardFunction]
    sampling: Sampling  # num_generations 1: each completion is sampled as a row of its own
    tokenizer: Any
    prompt_column: str
    chat: bool  # prompts are chat turns: completions reach the reward functions as assistant turns
    scale_rewards: str = "group"
    current: GenerationBatch | None = None

    @property
    def pad_token_id(self) -> int:
        """What fills prompts and completions to a batch's width (masked out): the tokenizer's pad token, or
        its end-of-sequence token where it has none."""
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def state_dict(self) -> dict:
        return {} if self.current is None else self.current.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.current = GenerationBatch.from_state(state) if state else None

    def batch_for(
        self,
        epoch: int,
        ref: MicroBatchRef,
        accelerator: Any,
        model: Any,
        logps_of: Callable[[Any, list[int]], dict[str, torch.Tensor]],
    ) -> GenerationBatch:
        """The generation batch micro-batch `ref` of `epoch` trains on, sampled now if it is a new one.
        `logps_of(batch, completions)` returns {"old": ..., "ref": ...} token log-probabilities of a
        micro-batch's completions, each key only where it is needed."""
        index = epoch * self.plan.generation_batches_per_epoch + ref.batch
        if self.current is None or self.current.index != index:
            self.current = None  # frees the previous one before sampling
            self.current = self._generate(epoch, ref.batch, index, accelerator, model, logps_of)
        return self.current

    def own_completions(self) -> list[list[int]]:
        """This rank's micro-batches of one pass over a generation batch."""
        return micro_batch_completions(self.plan, self.ranks.process_index)

    def _generate(self, epoch, batch, index, accelerator, model, logps_of) -> GenerationBatch:
        started = time.perf_counter()
        plan, G = self.plan, self.plan.num_generations
        order = epoch_order(self.seed, epoch, plan.num_prompts)
        size = plan.prompts_per_generation_batch
        rows = [int(row) for row in order[batch * size : (batch + 1) * size]]
        micro_batches = self.own_completions()
        mine = sorted({c for completions in micro_batches for c in completions})
        prompts = [self.train_set[rows[c // G]] for c in mine]
        with whole_weights(accelerator, model) as whole:
            sampled = sample(
                whole,
                [prompt[IDS] for prompt in prompts],
                self.sampling,
                self.pad_token_id,
                self.tokenizer.eos_token_id,
                seeds=[completion_seed(self.seed, index, c) for c in mine],
            )
        sampling_time = time.perf_counter() - started
        scores = self.score(self.train_set, prompts, sampled.ids)
        joined = self.ranks.concatenate(
            [
                (c, ids, cut, [row[k] for row in scores])
                for k, (c, ids, cut) in enumerate(zip(mine, sampled.ids, sampled.truncated, strict=True))
            ]
        )
        by_completion = {c: rest for c, *rest in joined}  # a completion two ranks train is the same on both
        count = plan.completions_per_generation_batch
        assert sorted(by_completion) == list(range(count)), "a completion of the generation batch has no rank"
        values = [by_completion[c][2] for c in range(count)]  # [completion][function]
        rows_by_function = [[value[i] for value in values] for i in range(len(self.rewards))]
        total = torch.tensor(total_rewards(self.rewards, rows_by_function), dtype=torch.float64)
        current = GenerationBatch(
            index=index,
            prompt_rows=rows,
            ids=[by_completion[c][0] for c in range(count)],
            truncated=[by_completion[c][1] for c in range(count)],
            rewards=torch.tensor(
                [[math.nan if v is None else v for v in row] for row in rows_by_function], dtype=torch.float64
            ).reshape(len(self.rewards), count),
            total=total,
            advantages=group_advantages(total.float(), G, self.scale_rewards),
            old_logps={},
            ref_logps={},
            sampling_time=max(self.ranks.gather(sampling_time)),
        )
        logps: dict[str, list] = {"old": [], "ref": []}
        for completions in micro_batches:
            for key, found in logps_of(current, completions).items():
                logps[key] += [
                    (c, row[: len(current.ids[c])].detach().float().cpu())
                    for c, row in zip(completions, found, strict=True)
                ]
        current.old_logps = dict(self.ranks.concatenate(logps["old"]))
        current.ref_logps = dict(self.ranks.concatenate(logps["ref"]))
        current.generation_time = max(self.ranks.gather(time.perf_counter() - started))
        return current

    def score(
        self, dataset: Any, prompts: list[dict], completion_ids: list[list[int]]
    ) -> list[list[float | None]]:
        """Each reward function's rewards of this rank's completions of `prompts` (rows of `dataset`),
        called with the dataset's other columns. A function that fails on any rank stops every rank."""
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": text}] for text in texts] if self.chat else texts
        columns = {name: [prompt[name] for prompt in prompts] for name in dataset.column_names if name != IDS}
        prompt_values = columns.pop(self.prompt_column)
        error, rows = None, []
        try:
            rows = score(self.rewards, prompt_values, completions, completion_ids, columns)
        except USER_ERRORS as err:
            error = err
        if self.ranks.any(error is not None):
            raise error or StoppedWithMainProcess("a reward function failed on another process")
        return rows


def step_metrics(
    batch: GenerationBatch,
    completions: Sequence[int],
    rewards: Sequence[RewardFunction],
    num_generations: int,
) -> dict[str, float]:
    """The records of an optimizer step that its completions decide (the same on every rank): rewards
    (total and per function), their spread within groups, completion lengths and truncation."""
    chosen = list(completions)
    total = batch.total[chosen]
    group_std = total.view(-1, num_generations).std(dim=1)
    lengths = torch.tensor([len(batch.ids[c]) for c in chosen], dtype=torch.float64)
    metrics = {
        "reward": total.mean().item(),
        "reward_std": total.std().item(),
        "reward_std_in_groups": group_std.mean().item(),
        "frac_reward_zero_std": (group_std == 0).double().mean().item(),
    }
    for name, row in zip(reward_names(rewards), batch.rewards[:, chosen], strict=True):
        given = row[~row.isnan()]
        metrics[f"rewards/{name}/mean"] = given.mean().item() if len(given) else math.nan
        metrics[f"rewards/{name}/std"] = given.std().item() if len(given) > 1 else math.nan
    metrics["completion_length_mean"] = lengths.mean().item()
    metrics["completion_length_max"] = int(lengths.max())
    metrics["truncated_fraction"] = sum(batch.truncated[c] for c in chosen) / len(chosen)
    return metrics


def reward_names(rewards: Sequence[RewardFunction]) -> list[str]:
    """Each function's name in records: its function name, or module:function where two share one."""
    short = [reward.name.rpartition(":")[2] for reward in rewards]
    return [r.name if short.count(s) > 1 else s for r, s in zip(rewards, short, strict=True)]


@torch.no_grad()
def evaluate_rewards(
    rollouts: Rollouts, eval_set: Any, accelerator: Any, model: Any, batch_size: int
) -> dict[str, float]:
    """The mean reward of one greedy completion of every eval prompt (total and per function), the prompts
    spread over the ranks."""
    ranks = rollouts.ranks
    rows = list(range(ranks.process_index, len(eval_set), ranks.num_processes))
    greedy = dataclasses.replace(rollouts.sampling, num_generations=1, temperature=0.0)
    prompts = [eval_set[row] for row in rows]
    ids: list[list[int]] = []
    with whole_weights(accelerator, model) as whole:
        for start in range(0, len(prompts), batch_size):
            chunk = [prompt[IDS] for prompt in prompts[start : start + batch_size]]
            tokenizer = rollouts.tokenizer
            ids += sample(whole, chunk, greedy, rollouts.pad_token_id, tokenizer.eos_token_id).ids
    scores = rollouts.score(eval_set, prompts, ids)
    total = total_rewards(rollouts.rewards, scores) if scores else []
    sums = [math.fsum(total)]
    for row in scores or [[] for _ in rollouts.rewards]:
        given = [value for value in row if value is not None]
        sums += [math.fsum(given), float(len(given))]
    sums = ranks.sum(torch.tensor(sums, dtype=torch.float64))
    results = {"eval_reward": sums[0] / len(eval_set)}
    for i, name in enumerate(reward_names(rollouts.rewards)):
        total_i, count_i = sums[1 + 2 * i], sums[2 + 2 * i]
        results[f"eval_rewards/{name}"] = total_i / count_i if count_i else math.nan
    return results


def write_completions(
    path: Any, batch: GenerationBatch, tokenizer: Any, num_generations: int, names: list[str]
) -> None:
    """Append a generation batch's completions, rewards and advantages to a JSON Lines file."""
    with open(path, "a") as f:
        for c, ids in enumerate(batch.ids):
            row = {
                "generation_batch": batch.index,
                "prompt_row": batch.prompt_rows[c // num_generations],
                "generation": c % num_generations,
                "completion": tokenizer.decode(ids, skip_special_tokens=True),
                "completion_ids": ids,
                "truncated": batch.truncated[c],
                "rewards": {
                    name: None if math.isnan(v) else v
                    for name, v in zip(names, batch.rewards[:, c].tolist(), strict=True)
                },
                "reward": batch.total[c].item(),
                "advantage": batch.advantages[c].item(),
            }
            f.write(json.dumps(row) + "\n")


def cut_completions(path: Any, last_batch: int) -> None:
    """Drop the rows of generation batches after `last_batch` (a resumed run samples them again)."""
    path = Path(path)
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if json.loads(line)["generation_batch"] <= last_batch))
