"""Diagnostics handed to the training loop: each watches the loop at a few points and adds fields to the
run's last record. The run builds them from its config (core/train/run.py); they change nothing the run
trains or writes otherwise.

    memory_census: true   MemoryCensus: what each process's tensors hold at six points of the run
    torch_compile: true   CompileCounter: how many graphs torch.compile built during the loop
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from recipes.core.distributed.ranks import Ranks
from recipes.core.train.memory_census import Census, census_record, take_census, tensors_with_grad


class Probe:
    """What the loop tells a probe; every method does nothing unless a probe needs it. Every rank calls
    each method at the same point, so collectives in `record` are allowed."""

    def loop_started(self, start_step: int, last_step: int) -> None:
        """Right before the loop's first window: it continues after optimizer step `start_step` (0, or the
        step a resumed run starts from) and ends after `last_step`."""

    def step_starting(self, step: int, model: Any) -> None:
        """Before the window of optimizer step `step` (1-based) is handed to the recipe; `model` is the one
        the recipe gave the loop, or None."""

    def step_done(self, step: int) -> None:
        """After optimizer step `step` and its non-finite check."""

    def record(self, ranks: Ranks) -> dict[str, Any]:
        """Fields for the run's last record, once the last step is done."""
        return {}


class MemoryCensus(Probe):
    """memory_census: what each process's tensors hold (core/train/memory_census.py) after loading the
    model (`model_loaded`, which load_pretrained calls through its on_loaded), at the loop's start, at the
    end of the model's first forward of the census step and of its backward, and after that step. The
    census step is the loop's second (its only one in a one-step run): ZeRO-3 prefetches from the module
    order it traced in the first, and torch's Adam has its states by then."""

    def __init__(self) -> None:
        self.censuses: dict[str, Census] = {}
        self.census_step = 0

    def model_loaded(self) -> None:
        """What loading left (ZeRO-3: partitions only), with the loading peak of the resident set."""
        self.censuses["loaded"] = take_census()

    def loop_started(self, start_step: int, last_step: int) -> None:
        self.census_step = min(start_step + 2, last_step)
        self.censuses["start"] = take_census()

    def step_starting(self, step: int, model: Any) -> None:
        if step == self.census_step and model is not None:
            self._census_after_forward(model)

    def step_done(self, step: int) -> None:
        if step == self.census_step:
            self.censuses["after_step"] = take_census()

    def record(self, ranks: Ranks) -> dict[str, Any]:
        return {"memory_census": census_record(self.censuses, ranks)}

    def _census_after_forward(self, model: Any) -> None:
        """Take the "forward" census when the model's next forward returns (before the loss's backward),
        and the "backward" one when that backward is complete (gradients reduced, before the optimizer
        steps: a DeepSpeed engine steps inside accelerator.backward)."""

        def backward_done() -> None:
            self.censuses["backward"] = take_census()

        def reached(_grad: torch.Tensor) -> None:  # queues the census for the end of the whole backward
            if not queued:
                queued.append(True)
                torch.autograd.Variable._execution_engine.queue_callback(backward_done)

        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            handle.remove()
            self.censuses["forward"] = take_census()
            for tensor in tensors_with_grad(output):  # the loss is computed from some of them
                tensor.register_hook(reached)

        queued: list[bool] = []
        handle = model.register_forward_hook(hook)


class CompileCounter(Probe):
    """torch_compile: the graphs torch.compile built from the probe's creation (right before the loop) to
    the loop's last step; recompilations show as graphs beyond the first few."""

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.log = log
        self.before = compiled_graphs()

    def record(self, ranks: Ranks) -> dict[str, Any]:
        built = compiled_graphs() - self.before
        self.log(f"torch.compile built {built} graphs in this run")
        return {"compiled_graphs": built}


def compiled_graphs() -> int:
    """Graphs torch.compile built in this process so far: the first compilation plus every recompilation
    (a batch shape it had not seen, for example)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
