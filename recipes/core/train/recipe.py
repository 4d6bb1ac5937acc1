"""What a recipe says of itself, in one object each recipe module exports as RECIPE: its config, its data
as `recipes plan` counts them, what a step counts, its LoRA task and its workload. The run (core/train/run.py)
and the `recipes` command (plan, doctor, calibration) know a recipe through this object only."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from recipes.core.model import lora
from recipes.core.model.source import load_tokenizer
from recipes.core.plan.steps import Plan
from recipes.core.plan.workload import Workload


def one_sequence_per_sample(cfg: Any) -> Workload:
    """The workload of a recipe that trains one sequence per sample, with no other model."""
    return Workload()


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str  # its configs are recipes/configs/<name>_*.yaml; the run's name in experiment trackers
    config_class: type
    script: str  # the file `accelerate launch` runs
    # (cfg, tokenizer) -> (tokenised train set, the data record plan.json holds), loaded as a run loads them;
    # tokenizer() returns the model's tokenizer (planning_tokenizer below), loaded once
    plan_data: Callable[[Any, Callable[[], Any]], tuple[Any, dict]]
    unit: str = "tokens"  # what an optimizer step counts in records, progress and throughput
    tokens_column: str = "num_targets"  # the train set's tokens per sample, as the plan averages them
    length_field: str = "max_seq_length"  # the config field that bounds a sequence's tokens
    lora_task: str | None = None  # core/model/lora.py's task; None: parameters are not planned
    # (cfg, tokenizer) -> from_pretrained arguments the planned parameter count needs (a classifier's labels)
    model_kwargs: Callable[[Any, Callable[[], Any]], dict] | None = None
    workload: Callable[[Any], Workload] = one_sequence_per_sample  # sequences per sample, reference model
    # (cfg, plan) -> the stage layout and bubble `recipes plan` shows next to the step plan
    pipeline_view: Callable[[Any, Plan], dict] | None = None
    # (cfg, train samples, world size) -> the recipe's own step plan (to_dict, summary) where the samples are
    # not what a step counts (GRPO: prompts, each sampled num_generations times); None: plan_for_config's
    step_plan: Callable[[Any, int, int], Any] | None = None

    def tokens_per_sample(self, train_set: Any) -> float:
        """Mean tokens per sample of a tokenised train set, as the plan counts them."""
        return sum(train_set[self.tokens_column]) / max(1, len(train_set))

    def planned_parameters(self, cfg: Any, tokenizer: Callable[[], Any]) -> dict[str, int]:
        """Trainable and total parameters a run will report, from the model config (LoRA: the adapters are
        the trainable ones) and what model_kwargs reads from the data."""
        if self.lora_task is None:
            return {}
        kwargs = self.model_kwargs(cfg, tokenizer) if self.model_kwargs else {}
        return lora.planned_parameter_fields(cfg, self.lora_task, **kwargs)


def planning_tokenizer(cfg: Any) -> Callable[[], Any]:
    """The model's tokenizer for `recipes plan`, loaded at the first call and kept: a plan of given sample
    counts (--num-samples) loads it only if the recipe's parameter count needs the data."""

    @functools.cache
    def tokenizer() -> Any:
        return load_tokenizer(cfg)  # the recipes' own check and message for a model that is not there

    return tokenizer
