"""The shared training loop, in-process: where Accelerate synchronises gradients inside a window, and the
clean-stop signal handling the loop enters.

The recipes' accumulation is exact only if gradients synchronise (and the optimizer steps) at exactly the
last micro-batch of every window: full windows, the short last window of an epoch, one-micro-batch
windows. These tests pin that on the installed Accelerate, so a release that counts differently fails
here rather than training a different accumulation.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin

from recipes.core.losses.accumulation import accumulation_windows
from recipes.core.train.loop import AccumulationMismatch, Window
from recipes.core.train.stop_signal import StopSignals


def prepared(ga: int):
    """A one-process CPU Accelerator accumulating `ga` micro-batches, as the recipes configure it, with a
    tiny model and its optimizer; the optimizer counts the updates it really applies."""
    accelerator = Accelerator(
        cpu=True,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=ga, sync_with_dataloader=False),
    )
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    updates = []
    optimizer.register_step_post_hook(lambda *_: updates.append(1))
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, updates


def train_windows(window_sizes: list[int], ga: int) -> tuple[list[list[bool]], list[int]]:
    """Run windows of these sizes the way the recipes do; return the sync flag seen inside
    `accelerator.accumulate` at every micro-batch, and the optimizer updates applied after each window."""
    accelerator, model, optimizer, updates = prepared(ga)
    flags, applied = [], []
    for size in window_sizes:
        window = Window([torch.ones(1, 3)] * size, epoch=0, index=0, lr=0.1)
        seen = []
        for batch in window.micro_batches(accelerator, model):
            with accelerator.accumulate(model):
                accelerator.backward(model(batch).sum())
                seen.append(accelerator.sync_gradients)
                optimizer.step()
                optimizer.zero_grad()
        flags.append(seen)
        applied.append(len(updates))
    return flags, applied


def test_gradients_sync_at_the_last_micro_batch_of_full_short_and_one_batch_windows():
    # GA 3 over an epoch of 7 micro-batches: windows 3, 3 and a short 1, then the next epoch's full ones.
    flags, applied = train_windows([3, 3, 1, 3, 2, 3], ga=3)
    assert flags == [
        [False, False, True],
        [False, False, True],
        [True],
        [False, False, True],
        [False, True],
        [False, False, True],
    ]
    assert applied == [1, 2, 3, 4, 5, 6]  # exactly one optimizer update per window


def test_without_accumulation_every_micro_batch_is_a_window_of_its_own():
    flags, applied = train_windows([1, 1, 1], ga=1)
    assert flags == [[True], [True], [True]]
    assert applied == [1, 2, 3]


def test_a_count_out_of_step_with_the_windows_stops_the_run():
    accelerator, model, _, _ = prepared(ga=2)
    with accelerator.accumulate(model):  # one micro-batch nobody planned: the count is now odd
        pass
    window = Window([torch.ones(1, 3)] * 2, epoch=0, index=0, lr=0.1)
    with pytest.raises(
        AccumulationMismatch, match="synchronised gradients at micro-batch 1 of a 2-micro-batch"
    ):
        for batch in window.micro_batches(accelerator, model):
            with accelerator.accumulate(model):
                accelerator.backward(model(batch).sum())


def test_windows_group_micro_batches_and_keep_the_short_last_one():
    assert list(accumulation_windows(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(accumulation_windows(range(6), 3)) == [[0, 1, 2], [3, 4, 5]]
    assert list(accumulation_windows(range(2), 1)) == [[0], [1]]


def test_first_signal_asks_to_stop_second_stops_at_once_and_leaving_restores_the_handlers():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with StopSignals() as signals:
        assert not signals.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.requested
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a second SIGTERM ends the process
        assert signal.getsignal(signal.SIGINT) not in (before[signal.SIGINT], signal.SIG_DFL)
    assert {sig: signal.getsignal(sig) for sig in before} == before
