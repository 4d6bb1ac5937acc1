"""GRPO's step arithmetic against a hand simulation of the loop it plans, over a grid of processes, micro
batch, accumulation, steps per generation, iterations and generations; and the refusals, with values
that work."""

from __future__ import annotations

import itertools

import pytest
from transformers import get_linear_schedule_with_warmup

from recipes.core.config import ConfigError
from recipes.core.plan.grpo import make_grpo_plan, micro_batch_completions

PROMPTS, EPOCHS = 50, 2


def simulate(prompts: int, dp: int, micro: int, ga: int, spg: int, iterations: int, generations: int):
    """Walk the loop: every generation batch samples `generations` completions of each of its prompts
    (dp x micro x spg completions, in prompt order), is passed over `iterations` times, each pass in spg
    micro-batches per rank (the completions of a pass cut into consecutive steps of dp x micro x ga),
    and every ga micro-batches of every rank make one optimizer step. Returns the counts, or why the loop
    cannot run so: a group cut by the generation batch, a group split across steps, or a step whose
    micro-batches come from two passes."""
    if generations < 2:
        return "fewer than 2 generations"
    size = dp * micro * spg
    if size % generations:
        return "a group cut by the generation batch"
    per_prompt = size // generations
    per_step = dp * micro * ga
    steps, batches, step_sets = 0, 0, []
    window: list[tuple[int, int]] = []  # (pass id, micro-batch index) of the micro-batches of the open step
    passes = 0
    for _ in range(EPOCHS):
        for _ in range(prompts // per_prompt):
            batches += 1
            for _ in range(iterations):
                passes += 1
                for index in range(spg):
                    window.append((passes, index))
                    if len(window) == ga:
                        if len({p for p, _ in window}) > 1:
                            return "a step across two passes"
                        first = window[0][1] // ga * per_step
                        completions = range(first, first + per_step)
                        groups = {c // generations for c in completions}
                        if any(
                            g * generations < first or (g + 1) * generations > first + per_step
                            for g in groups
                        ):
                            return "a group split across steps"
                        step_sets.append(set(completions))
                        steps += 1
                        window = []
    return {"steps": steps, "batches": batches, "per_prompt": per_prompt, "step_sets": step_sets[: spg // ga]}


GRID = list(
    itertools.product(
        (1, 2, 3, 4),  # processes
        (1, 2, 3, 4),  # completions per micro-batch
        (1, 2, 3),  # accumulation
        (None, 2, 4, 6),  # steps per generation (None: GA)
        (1, 2, 3),  # iterations
        (1, 2, 3, 4, 6, 8),  # generations
    )
)


def test_the_plan_is_the_simulated_loop_over_the_whole_grid():
    refused = 0
    for dp, micro, ga, spg, iterations, generations in GRID:
        expected = simulate(PROMPTS, dp, micro, ga, spg or ga, iterations, generations)
        case = (dp, micro, ga, spg, iterations, generations, expected if isinstance(expected, str) else "")
        try:
            plan = make_grpo_plan(
                num_prompts=PROMPTS,
                world_size=dp,
                micro_batch_size=micro,
                gradient_accumulation_steps=ga,
                steps_per_generation=spg,
                num_iterations=iterations,
                num_generations=generations,
                num_train_epochs=EPOCHS,
                learning_rate=1e-6,
            )
        except ConfigError:
            refused += 1
            assert isinstance(expected, str), case
            continue
        assert not isinstance(expected, str), case
        assert plan.total_optimizer_steps == EPOCHS * plan.optimizer_steps_per_epoch == expected["steps"], (
            case
        )
        assert plan.generation_batches == expected["batches"], case
        assert plan.prompts_per_generation_batch == expected["per_prompt"], case
        assert plan.prompts_per_step * generations == plan.completions_per_step == dp * micro * ga, case
        assert plan.prompts_per_epoch + plan.prompts_left_out_per_epoch == PROMPTS, case
        # The layout the recipe trains: each rank's micro-batches of a pass, ga at a time, make the
        # simulated steps, and every completion of the generation batch is trained once per pass.
        layouts = [micro_batch_completions(plan, rank) for rank in range(dp)]
        assert all(len(batches) == plan.steps_per_generation for batches in layouts), case
        for t, step in enumerate(expected["step_sets"]):
            held = [c for batches in layouts for b in batches[t * ga : (t + 1) * ga] for c in b]
            assert sorted(held) == sorted(step), case
    assert 0 < refused < len(GRID)


def test_the_reported_run_of_8000_prompts_takes_4000_steps():
    """8,000 prompts x 6 generations x 2 epochs at micro 4 x 3 processes x GA 2: a generation batch of 24
    completions (4 prompts) trained once makes 1 step, 2,000 per epoch."""
    plan = make_grpo_plan(
        num_prompts=8000,
        world_size=3,
        micro_batch_size=4,
        gradient_accumulation_steps=2,
        num_generations=6,
        num_train_epochs=2,
        learning_rate=1e-6,
        max_completion_length=128,
    )
    assert (plan.completions_per_generation_batch, plan.prompts_per_generation_batch) == (24, 4)
    assert (plan.optimizer_steps_per_epoch, plan.total_optimizer_steps) == (2000, 4000)
    assert plan.max_generated_tokens_per_step == 24 * 128


def test_global_batch_size_fixes_the_completions_per_step_and_iterations_multiply_the_steps():
    plan = make_grpo_plan(
        num_prompts=64,
        world_size=4,
        micro_batch_size=2,
        global_batch_size=32,
        steps_per_generation=8,
        num_iterations=2,
        num_generations=8,
        learning_rate=1e-6,
        warmup_ratio=0.1,
    )
    # GA 32 / (2 x 4) = 4; a generation batch of 2 x 4 x 8 = 64 completions (8 prompts) passed over twice
    # in 8 micro-batches per pass: 2 x 8 / 4 = 4 steps; 64 prompts: 8 generation batches, 32 steps.
    assert plan.gradient_accumulation_steps == 4
    assert (plan.optimizer_steps_per_generation_batch, plan.total_optimizer_steps) == (4, 32)
    assert plan.warmup_steps == 4  # ceil(0.1 x 32)


def test_the_schedule_is_get_linear_schedule_with_warmup_over_the_planned_steps():
    import torch

    plan = make_grpo_plan(
        num_prompts=40,
        world_size=2,
        micro_batch_size=2,
        gradient_accumulation_steps=2,
        num_generations=4,
        num_iterations=2,
        learning_rate=1e-3,
        warmup_steps=3,
        num_train_epochs=3,
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=plan.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_optimizer_steps)
    used = []
    for _ in range(plan.total_optimizer_steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert used == [plan.lr_at(step) for step in range(1, plan.total_optimizer_steps + 1)]


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"num_generations": 1},
            "num_generations is 1: a completion's advantage is its reward against the other completions of its "
            "prompt, so each prompt needs at least 2; set num_generations to 2 or more",
        ),
        (
            {"world_size": 3, "micro_batch_size": 1, "gradient_accumulation_steps": 1, "num_generations": 4},
            "a generation batch of per_device_train_batch_size x data-parallel size x steps_per_generation = "
            "1 x 3 x 1 = 3 completions is not a whole number of groups of num_generations 4; use "
            "steps_per_generation 4, or per_device_train_batch_size 4, or num_generations 3",
        ),
        (
            {"world_size": 3, "micro_batch_size": 1, "steps_per_generation": 4, "num_generations": 4},
            "an optimizer step trains per_device_train_batch_size x data-parallel size x "
            "gradient_accumulation_steps = 1 x 3 x 1 = 3 completions, not a whole number of groups of "
            "num_generations 4: a prompt's completions would be split across optimizer steps; use "
            "gradient_accumulation_steps 4, or per_device_train_batch_size 4, or num_generations 3",
        ),
        (
            {"gradient_accumulation_steps": 2, "steps_per_generation": 3},
            "steps_per_generation = 3 is not a multiple of gradient_accumulation_steps 2: an optimizer step "
            "would take micro-batches from two generation batches; use 2 or 4",
        ),
        (
            {"num_prompts": 3, "world_size": 2, "micro_batch_size": 4, "num_generations": 2},
            "3 prompts fill no generation batch of 4 prompts (8 completions / num_generations 2); provide at "
            "least 4 prompts, or lower per_device_train_batch_size, steps_per_generation or the number of "
            "processes",
        ),
        (
            {"generation_batch_size": 6, "micro_batch_size": 4, "num_generations": 2},
            "generation_batch_size 6 is not a multiple of per_device_train_batch_size x data-parallel size = 4; "
            "use a multiple of 4 (e.g. 4)",
        ),
    ],
)
def test_settings_the_loop_cannot_follow_are_refused_with_values_that_work(settings, message):
    values = {
        "num_prompts": 64,
        "world_size": 1,
        "micro_batch_size": 2,
        "num_generations": 2,
        "learning_rate": 1e-6,
    }
    with pytest.raises(ConfigError) as err:
        make_grpo_plan(**{**values, **settings})
    assert str(err.value) == message
