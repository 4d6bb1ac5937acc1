"""The step arithmetic against brute-force simulations and against Accelerate's own sharding."""

from __future__ import annotations

import itertools

import pytest
from accelerate.data_loader import BatchSamplerShard
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import BatchSampler, SequentialSampler

from recipes.core.plan.steps import (
    batches_before_sharding,
    batches_per_rank,
    data_parallel_size,
    gradient_accumulation_for,
    linear_warmup_decay_lr,
    make_plan,
    warmup_steps_for,
)


def simulated_rank_batch_sizes(n: int, bs: int, procs: int, drop_last: bool) -> list[list[int]]:
    """Deal whole batches round-robin; with drop_last stop at the last full round of full batches,
    otherwise (even_batches) top the last round up with samples from the start of the epoch."""
    sizes = [min(bs, n - start) for start in range(0, n, bs)]
    if drop_last:
        sizes = [s for s in sizes if s == bs]
        rounds = len(sizes) // procs
        return [[bs] * rounds for _ in range(procs)]
    if sizes and (sizes[-1] < bs or len(sizes) % procs):
        sizes[-1] = bs  # the short batch is filled with recycled samples
        sizes += [bs] * (-len(sizes) % procs)
    return [sizes[rank::procs] for rank in range(procs)]


def accelerate_rank_batches(
    n: int, bs: int, procs: int, drop_last: bool, even_batches: bool = True
) -> list[list]:
    sampler = BatchSampler(SequentialSampler(range(n)), batch_size=bs, drop_last=drop_last)
    return [
        list(BatchSamplerShard(sampler, num_processes=procs, process_index=r, even_batches=even_batches))
        for r in range(procs)
    ]


def simulated_steps(per_rank_batches: int, ga: int, epochs: int, max_steps: int) -> tuple[int, int]:
    """Run the accumulation loop itself: windows of ga micro-batches, a short last window, counters reset
    every epoch; max_steps > 0 keeps going over epochs until it is reached. Returns (steps, epochs started)."""
    steps, started = 0, 0
    while max_steps > 0 or started < epochs:
        started += 1
        in_window = 0
        for batch in range(per_rank_batches):
            in_window += 1
            if in_window == ga or batch == per_rank_batches - 1:
                steps, in_window = steps + 1, 0
                if steps == max_steps:
                    return steps, started
    return steps, started


@settings(max_examples=3000, deadline=None)
@given(
    n=st.integers(0, 300),
    bs=st.integers(1, 12),
    procs=st.integers(1, 8),
    drop_last=st.booleans(),
)
def test_batches_per_rank_matches_simulation_and_accelerate_sharding(n, bs, procs, drop_last):
    batches = batches_before_sharding(n, bs, drop_last)
    real = accelerate_rank_batches(n, bs, procs, drop_last)
    simulated = simulated_rank_batch_sizes(n, bs, procs, drop_last)
    predicted = batches_per_rank(batches, procs, drop_last=drop_last)
    for rank in range(procs):
        assert len(real[rank]) == predicted == len(simulated[rank])
        assert [len(b) for b in real[rank]] == simulated[rank]


@settings(max_examples=1000, deadline=None)
@given(n=st.integers(1, 200), bs=st.integers(1, 8), procs=st.integers(1, 6))
def test_uneven_batches_give_the_first_ranks_one_more(n, bs, procs):
    batches = batches_before_sharding(n, bs)
    real = accelerate_rank_batches(n, bs, procs, drop_last=False, even_batches=False)
    for rank in range(procs):
        assert len(real[rank]) == batches_per_rank(batches, procs, even_batches=False, process_index=rank)


@pytest.mark.parametrize("n,bs,procs", [(10, 4, 2), (64, 8, 4), (7, 2, 3), (1, 4, 1)])
def test_split_batches_keeps_every_batch_on_every_rank(n, bs, procs):
    batches = batches_before_sharding(n, bs * procs)
    sampler = BatchSampler(SequentialSampler(range(n)), batch_size=bs * procs, drop_last=False)
    shard = BatchSamplerShard(sampler, num_processes=procs, process_index=0, split_batches=True)
    assert len(list(shard)) == batches_per_rank(batches, procs, split_batches=True) == batches


@settings(max_examples=3000, deadline=None)
@given(
    n=st.integers(1, 400),
    bs=st.integers(1, 16),
    ga=st.integers(1, 8),
    procs=st.integers(1, 8),
    epochs=st.integers(1, 3),
    max_steps=st.one_of(st.just(-1), st.integers(1, 60)),
    drop_last=st.booleans(),
    warmup=st.integers(0, 10),
)
def test_plan_matches_a_simulated_accumulation_loop(n, bs, ga, procs, epochs, max_steps, drop_last, warmup):
    real = accelerate_rank_batches(n, bs, procs, drop_last)
    per_rank = len(real[0])
    kwargs = dict(
        num_samples=n,
        world_size=procs,
        micro_batch_size=bs,
        gradient_accumulation_steps=ga,
        num_train_epochs=epochs,
        max_steps=max_steps,
        warmup_steps=warmup,
        learning_rate=1e-3,
        drop_last=drop_last,
    )
    if per_rank == 0:
        with pytest.raises(ValueError, match="give no batch"):
            make_plan(**kwargs)
        return
    plan = make_plan(**kwargs)
    total, epochs_started = simulated_steps(per_rank, ga, epochs, max_steps)
    assert plan.batches_per_epoch_per_rank == per_rank
    assert plan.optimizer_steps_per_epoch == simulated_steps(per_rank, ga, 1, -1)[0]
    assert plan.total_optimizer_steps == total
    assert plan.num_epochs == epochs_started
    assert plan.global_batch_size == bs * ga * procs


def test_fractional_epochs_round_up_to_whole_steps():
    plan = make_plan(
        num_samples=100, world_size=1, micro_batch_size=10, num_train_epochs=0.25, learning_rate=1.0
    )
    assert plan.optimizer_steps_per_epoch == 10
    assert plan.total_optimizer_steps == 3  # ceil(2.5)
    assert plan.num_epochs == 1


@pytest.mark.parametrize(
    "total,steps,ratio,expected",
    [(100, 0, 0.1, 10), (101, 0, 0.1, 11), (7, 0, 0.5, 4), (50, 3, 0.9, 3), (9, 0, 0.0, 0)],
)
def test_warmup_steps_win_over_ratio_and_ratio_rounds_up(total, steps, ratio, expected):
    assert warmup_steps_for(total, steps, ratio) == expected


def test_lr_formula_starts_at_zero_peaks_after_warmup_and_ends_at_zero():
    peak, warmup, total = 2e-4, 4, 10
    lrs = [linear_warmup_decay_lr(s, peak, warmup, total) for s in range(1, total + 2)]
    assert lrs[0] == 0.0
    assert lrs[warmup] == peak  # step warmup + 1 is the first at the peak
    assert max(lrs) == peak and lrs.index(peak) == warmup
    assert all(a < b for a, b in itertools.pairwise(lrs[: warmup + 1]))
    assert all(a > b for a, b in itertools.pairwise(lrs[warmup : total + 1]))
    assert lrs[total - 1] == peak * (1 / (total - warmup)) and lrs[total] == 0.0


def test_lr_formula_equals_transformers_schedule_bit_for_bit():
    import torch
    from transformers import get_linear_schedule_with_warmup

    for warmup, total in [(0, 5), (3, 17), (10, 10), (1, 1)]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
        sched = get_linear_schedule_with_warmup(opt, warmup, total)
        for step in range(1, total + 2):
            assert sched.get_last_lr()[0] == linear_warmup_decay_lr(step, 3e-4, warmup, total)
            opt.step()
            sched.step()


def test_data_parallel_size_divides_out_pipeline_and_tensor_parallel_groups():
    assert data_parallel_size(16, pipeline_stages=2, tensor_parallel_size=2) == 4
    with pytest.raises(
        ValueError, match="world size 6 is not divisible by pipeline_stages x tensor_parallel_size"
    ):
        data_parallel_size(6, pipeline_stages=4)


def test_global_batch_size_derives_accumulation_or_names_sizes_that_divide():
    assert gradient_accumulation_for(64, 4, 8) == 2
    with pytest.raises(ValueError) as err:
        gradient_accumulation_for(100, 4, 8)
    assert "use a multiple of 32 (nearest: 96 or 128)" in str(err.value)
    with pytest.raises(ValueError, match=r"nearest: 32\)"):
        gradient_accumulation_for(20, 4, 8)


def test_a_dataloader_of_another_length_than_planned_stops_the_run():
    plan = make_plan(num_samples=37, world_size=2, micro_batch_size=2, learning_rate=1e-3)
    plan.check_loader_length(10)  # 19 batches over 2 ranks, the last round topped up
    with pytest.raises(RuntimeError, match="plan expects 10 batches per rank, the sharded dataloader has 9"):
        plan.check_loader_length(9)
