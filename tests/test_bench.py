"""The benchmark harness measures what it says: its baselines train the recipe's job, its arithmetic is
right, and the README's table is the committed results file."""

from __future__ import annotations

import json
import re
import statistics

import pytest
from helpers import REPO, Sums, float32_tolerance
from transformers import AutoConfig

from bench.job import Job, run_baseline, run_recipe
from bench.measures import (
    batches_of,
    long_tailed_lengths,
    median_ratio,
    mfu,
    model_flops_per_second,
    real_token_fraction,
)
from bench.report import render_table
from bench.sections import check_same_job
from recipes.core.model.shape import model_shape

RESULTS = REPO / "bench" / "results" / "cpu.json"


@pytest.fixture(scope="module")
def job_runs(tiny_llama):
    job = Job(model=str(tiny_llama), samples=20, micro_batch=4, gradient_accumulation=2, max_seq_length=96)
    return {
        "recipe": run_recipe(job),
        "recipe_packed": run_recipe(job.replace(packing=True)),
        "bare": run_baseline("bare", job),
        "trainer": run_baseline("trainer", job),
    }


@pytest.mark.slow
def test_every_runner_trains_the_same_samples_in_the_same_steps(job_runs):
    # 20 samples in micro-batches of 4 make 5 batches: windows of 2, 2 and 1.
    for name, run in job_runs.items():
        assert run["steps"] == 3, name
        assert run["target_tokens"] == job_runs["recipe"]["target_tokens"], name
    assert job_runs["bare"]["step_tokens"] == job_runs["recipe"]["step_tokens"]
    assert job_runs["recipe_packed"]["step_tokens"] == job_runs["recipe"]["step_tokens"]


def same_job_tolerance(tiny_llama, run: dict) -> float:
    """How far rounding can move a step's loss relative to itself (each at least 1, about ln 400): the
    token-mean loss of the job's 8 samples of up to 96 tokens, its sums added in another order (the
    recipe's chunked loss). The weights' rounding over the job's 3 steps at LRs up to 1e-4 (adam_tolerance,
    under 1e-5) moves a loss by that times its gradient's norm, which the shared job records near 1."""
    config = AutoConfig.from_pretrained(tiny_llama)
    sums = Sums(config, 96, step_sequences=8, eval_sequences=0, outputs=config.vocab_size)
    return float32_tolerance(sums.loss(max(run["step_tokens"])), 1.0)


@pytest.mark.slow
def test_bare_loop_computes_the_recipe_losses_on_the_same_tensors(job_runs, tiny_llama):
    recipe, bare = job_runs["recipe"], job_runs["bare"]
    tolerance = same_job_tolerance(tiny_llama, recipe)
    for a, b in zip(recipe["step_losses"], bare["step_losses"], strict=True):
        assert abs(a - b) <= tolerance * a
    check_same_job(recipe, bare, tolerance)


@pytest.mark.slow
def test_trainer_trains_the_recipe_job_to_the_same_losses(job_runs, tiny_llama):
    recipe, trainer = job_runs["recipe"], job_runs["trainer"]
    # The Trainer logs losses rounded to 4 decimals: half a unit of the last, on top of float rounding.
    tolerance = same_job_tolerance(tiny_llama, recipe) + 0.5e-4
    for a, b in zip(recipe["step_losses"], trainer["step_losses"], strict=True):
        assert abs(a - b) <= tolerance * a
    check_same_job(recipe, trainer, tolerance)


@pytest.mark.slow
def test_a_runner_on_another_job_is_refused(job_runs, tiny_llama):
    other = {**job_runs["bare"], "step_losses": [x + 0.01 for x in job_runs["bare"]["step_losses"]]}
    with pytest.raises(RuntimeError, match=r"step 1: bare loss .* not the same job"):
        check_same_job(job_runs["recipe"], other, same_job_tolerance(tiny_llama, job_runs["recipe"]))


def test_real_token_fraction_counts_padding_to_the_longest_sample_of_each_batch():
    lengths = [3, 5, 2, 7, 4]
    batches = batches_of([4, 0, 1, 2, 3], micro_batch=2)
    assert batches == [[4, 0], [1, 2], [3]]
    # Slots: 2 x 4 + 2 x 5 + 1 x 7 = 25, of which 21 hold tokens.
    assert real_token_fraction(lengths, batches, packing=False) == 21 / 25
    assert real_token_fraction(lengths, batches, packing=True) == 1.0


def test_long_tailed_lengths_are_reproducible_capped_and_skewed():
    lengths = long_tailed_lengths(4000, median=120, sigma=1.0, cap=2048, seed=3)
    assert lengths == long_tailed_lengths(4000, median=120, sigma=1.0, cap=2048, seed=3)
    assert min(lengths) >= 8 and max(lengths) == 2048
    assert 108 <= statistics.median(lengths) <= 132
    assert statistics.mean(lengths) > 1.4 * statistics.median(lengths)  # log-normal: mean = median e^(s^2/2)


def test_median_ratio_pairs_repetitions_side_by_side():
    runs = [{"target_tokens": t, "runtime": s} for t, s in ((100, 1.0), (100, 2.0), (100, 4.0))]
    base = [{"target_tokens": 100, "runtime": s} for s in (2.0, 2.0, 2.0)]
    ratio = median_ratio(runs, base)
    assert ratio["all"] == [2.0, 1.0, 0.5]
    assert (ratio["median"], ratio["min"], ratio["max"]) == (1.0, 0.5, 2.0)


def test_model_flops_are_6n_per_token_plus_the_attention_term(tiny_llama):
    shape = model_shape(str(tiny_llama))
    # The tiny Llama: 2 layers, hidden 32, 4 heads of 8, 2 KV heads, MLP 64, untied embeddings.
    per_layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32  # q, k+v, o, MLP, 2 norms
    assert shape.non_embedding_params == 2 * per_layer + 32  # + the final norm
    flops = model_flops_per_second(shape, tokens=1000, mean_seq_len=50, seconds=2.0)
    assert flops == (6 * shape.non_embedding_params * 1000 + 12 * 2 * 32 * 50 * 1000) / 2.0
    assert mfu(flops, peak_flops=4 * flops) == 0.25


def test_readme_benchmark_table_is_the_committed_results_file():
    readme = (REPO / "README.md").read_text()
    table = re.search(r"<!-- bench:start -->\n(.*?)\n<!-- bench:end -->", readme, re.S)
    assert table, "README.md has no benchmark table between <!-- bench:start --> and <!-- bench:end -->"
    assert table.group(1) == render_table(json.loads(RESULTS.read_text()))
