"""The training loop's bookkeeping, written once for every recipe.

A recipe keeps the lines its training is about (accumulate, forward, loss, backward, clipping, the
optimizer and scheduler steps) and hands the rest to a TrainingLoop:

    with run.training_loop(...) as loop:
        for window in loop.windows(train_loader, model):
            ...  # one optimizer step over the window's micro-batches
            loop.step_done(window, count=...)
        ...  # save the final model

The loop runs the epochs from where a resumed run stands, groups micro-batches into accumulation windows
(read ahead, so that a step's target tokens can be counted on every rank before its first backward),
shows progress, writes each step's record, evaluates every eval_steps, checks each step for non-finite
values, checkpoints every save_steps, stops cleanly on SIGTERM/SIGINT (core/train/stop_signal.py) and stops at
the plan's last step, where it writes the run's cost (core/train/usage.py) and what its probes found
(core/train/probes.py), and evaluates the final model. When the recipe leaves the `with` block normally
(the final model saved), the records are closed: curves.png is drawn and the trackers finish.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import torch
from accelerate.data_loader import skip_first_batches
from tqdm.auto import tqdm

from recipes.core.distributed.fsdp import plain_norm, set_gradient_sync
from recipes.core.distributed.ranks import Ranks
from recipes.core.exit_status import EXIT_INTERRUPTED
from recipes.core.losses.accumulation import accumulation_windows
from recipes.core.output.checkpoint import Checkpointer
from recipes.core.output.records import RunRecords
from recipes.core.output.run_dir import Position
from recipes.core.plan.steps import Plan
from recipes.core.train.nonfinite import NonFiniteSteps
from recipes.core.train.probes import Probe
from recipes.core.train.stop_signal import StopSignals
from recipes.core.train.usage import LoopUsage

B = TypeVar("B")


class AccumulationMismatch(RuntimeError):
    """Accelerate synchronised gradients at another micro-batch than the window's last."""


@dataclasses.dataclass
class Window(Generic[B]):
    """The micro-batches of one optimizer step, where they sit in the epoch, the step's LR, and what the
    step gives its record: the summed loss of this rank, the gradient norm, whether it was skipped."""

    batches: list[B]
    epoch: int
    index: int  # in the epoch, counting windows a resumed run skipped
    lr: float
    started: float = dataclasses.field(default_factory=time.perf_counter)
    loss_sum: torch.Tensor | None = None
    grad_norm: Any = None
    skipped: bool = False

    def add_loss(self, summed: torch.Tensor) -> torch.Tensor:
        """Add a micro-batch's summed loss to the step's (for its record); returns `summed` for backward."""
        self.loss_sum = summed.detach() if self.loss_sum is None else self.loss_sum + summed.detach()
        return summed

    def __iter__(self) -> Iterator[B]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def micro_batches(self, accelerator: Any, model: Any) -> Iterator[B]:
        """The micro-batches, for the recipe to run each inside `accelerator.accumulate(model)`, so that
        gradients synchronise (and the optimizer steps, and a DeepSpeed engine steps) at exactly the last.

        accumulate counts the micro-batches it is entered for and synchronises on every
        gradient_accumulation_steps-th. A short window (the last of an epoch) is preceded by empty
        entries, so that its own last micro-batch is that one and the count is a multiple of the
        accumulation steps at every window start (Accelerate checkpoints the count, so also after a
        resume). After each micro-batch the public sync flag is checked: an Accelerate release that
        counts differently stops the run at its first step instead of training a wrong accumulation.

        An FSDP2 model reduce-scatters its gradients only in the last micro-batch's backward (its public
        set_requires_gradient_sync; Accelerate's accumulate does this on GPUs, not on CPU processes).
        """
        for _ in range(accelerator.gradient_accumulation_steps - len(self.batches)):
            with accelerator.accumulate(model):
                pass
        last = len(self.batches) - 1
        for i, batch in enumerate(self.batches):
            set_gradient_sync(model, i == last)
            yield batch
            if accelerator.sync_gradients != (i == last):
                raise AccumulationMismatch(
                    f"accelerator.accumulate {'synchronised' if i < last else 'did not synchronise'} "
                    f"gradients at micro-batch {i + 1} of a {len(self.batches)}-micro-batch window "
                    f"(gradient_accumulation_steps {accelerator.gradient_accumulation_steps}); this "
                    "version of accelerate counts accumulation differently from the ones this project is "
                    "tested with: install one of those (see pyproject.toml)"
                )


@dataclasses.dataclass(frozen=True)
class Course:
    """The optimizer steps a loop runs: the plan's, from `start` (where a resumed run stands), at the LRs of
    `scheduler` (which the recipe steps); `unit` names what a step counts (target tokens, pairs, samples)
    in records, progress and throughput."""

    plan: Plan
    start: Position
    scheduler: Any
    unit: str = "tokens"


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """`evaluate(step)` evaluates (and records) the model at an optimizer step: before the first step, every
    `every` steps (eval_steps; 0: none in between) and after the last."""

    evaluate: Callable[[int], None]
    every: int = 0

    def due_after(self, step: int, last_step: int) -> bool:
        """Whether to evaluate after `step` on the way to `last_step` (the last one is evaluated anyway)."""
        return bool(self.every) and step % self.every == 0 and step != last_step


@dataclasses.dataclass(frozen=True)
class LoopOutputs:
    """What the loop leaves of the run: each step's record (metrics.jsonl and the trackers; curves.png when
    the records close), the checkpoints, and lines on the console."""

    records: RunRecords
    checkpoints: Checkpointer
    log: Callable[[str], None] = print


class TrainingLoop:
    """Everything around a recipe's optimizer step; see the module docstring for how a recipe uses it."""

    def __init__(
        self,
        course: Course,
        ranks: Ranks,
        outputs: LoopOutputs,
        nonfinite: NonFiniteSteps,
        evaluation: Evaluation,
        probes: Sequence[Probe] = (),
    ):
        """`ranks`: where step counts and losses are summed; `nonfinite`: what a step with a non-finite
        loss or gradient norm does; `probes`: diagnostics that add fields to the run's last record."""
        self.plan, self.start, self.scheduler = course.plan, course.start, course.scheduler
        self.unit = course.unit
        self.ranks, self.nonfinite, self.evaluation, self.probes = ranks, nonfinite, evaluation, probes
        self.records, self.checkpoints, self.log = outputs.records, outputs.checkpoints, outputs.log
        self.step = self.start.step
        self.trained = 0  # target tokens (or samples) trained on since the loop started
        self.signals = StopSignals()
        self.usage: LoopUsage | None = None
        self.progress: Any = None
        self.batches_per_epoch = 0

    def __enter__(self) -> TrainingLoop:
        self.signals.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.progress is not None:
            self.progress.close()
        self.signals.__exit__(*exc_info)
        self.records.close(completed=exc_info[0] is None)

    def windows(self, loader: Any, model: Any = None) -> Iterator[Window]:
        """The accumulation windows of the rest of the run; the last one is the plan's last step, after
        which the run's record (LR after training, runtime, throughput, peak memory) is written and the
        final model evaluated. `loader` is the prepared (sharded) train loader; `model`, if given, is put
        in train mode once the step-0 evaluation ran (from_pretrained returns it in eval mode)."""
        if self.step == 0:
            self.evaluation.evaluate(0)
        if model is not None:
            model.train()
        ga, total = self.plan.gradient_accumulation_steps, self.plan.total_optimizer_steps
        self.batches_per_epoch = len(loader)
        self.progress = tqdm(
            total=total, initial=self.step, disable=not self.ranks.is_main_process, desc="train"
        )
        self.usage = LoopUsage(self.ranks)
        for probe in self.probes:
            probe.loop_started(self.start.step, total)
        for epoch in range(self.start.epoch, self.plan.num_epochs):
            loader.set_epoch(epoch)
            skip = self.start.batches_in_epoch if epoch == self.start.epoch else 0  # trained before a resume
            batches = skip_first_batches(loader, skip) if skip else loader
            for index, batches_of_step in enumerate(accumulation_windows(batches, ga), start=skip // ga):
                for probe in self.probes:
                    probe.step_starting(self.step + 1, model)
                yield Window(batches_of_step, epoch, index, lr=self.scheduler.get_last_lr()[0])
                if self.step == total:
                    self._finish()
                    return

    def clip_gradients(self, window: Window, accelerator: Any, model: Any) -> None:
        """At the window's last micro-batch, once its gradients are synchronised: clip them to
        max_grad_norm and keep the norm for the step's record. Under on_nonfinite: skip, a step whose loss
        or norm is not finite on any rank loses its gradients here, so the optimizer.step() that follows
        changes neither weights nor optimizer state (torch optimizers pass over parameters without a
        gradient); every rank takes the same decision."""
        clip = self.nonfinite.clip_norm
        window.grad_norm = plain_norm(accelerator.clip_grad_norm_(model.parameters(), clip)) if clip else None
        window.skipped = self.nonfinite.skip_update(window.loss_sum, window.grad_norm)
        if window.skipped:
            for parameter in model.parameters():
                parameter.grad = None

    def step_done(
        self,
        window: Window,
        *,
        count: int,
        loss: float | None = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """After the window's optimizer and scheduler steps: `count` is its target tokens (or samples)
        over all ranks; `loss` its mean loss over all ranks, by default the window's loss sums over all
        ranks divided by `count`; `metrics` more values for the step's record. Stops the run on a
        non-finite step, and on SIGTERM/SIGINT after a checkpoint."""
        if loss is None:
            loss = self.ranks.sum(window.loss_sum) / count
        self.step += 1
        step, plan, grad_norm = self.step, self.plan, window.grad_norm
        skip_fields = self.nonfinite.step_done(step, loss, grad_norm, window.skipped)  # or stops the run
        for probe in self.probes:
            probe.step_done(step)
        self.trained += count
        step_time = time.perf_counter() - window.started
        self.progress.update(1)
        self.progress.set_postfix(
            {
                "loss": f"{loss:.4f}",
                "lr": f"{window.lr:.2e}",
                f"{self.unit}_per_s": f"{count / step_time:.1f}",
            }
        )
        self.records.log_step(
            plan,
            epoch=window.epoch,
            window_index=window.index,
            step=step,
            lr=window.lr,
            loss=loss,
            grad_norm=grad_norm,
            **skip_fields,
            **{self.unit: count},
            **(metrics or {}),
            step_time=step_time,
        )
        if self.evaluation.due_after(step, plan.total_optimizer_steps):
            self.evaluation.evaluate(step)
        # Every rank takes part in the agreement every step; a signal during the last step ends the run as usual.
        stopping = self.ranks.any(self.signals.requested) and step < plan.total_optimizer_steps
        batches_done = min((window.index + 1) * plan.gradient_accumulation_steps, self.batches_per_epoch)
        self.checkpoints.step_done(
            Position(step, window.epoch, batches_done), self.batches_per_epoch, stopping
        )
        if stopping:
            self.log(
                f"stopped by signal after step {step}; continue with --resume_from_checkpoint latest "
                f"(exit status {EXIT_INTERRUPTED})"
            )
            self.ranks.end()
            raise SystemExit(EXIT_INTERRUPTED)

    def _finish(self) -> None:
        self.progress.close()
        record = {
            "step": self.step,
            "lr_after_training": self.scheduler.get_last_lr()[0],
            **self.usage.summary(self.trained, self.unit),
        }
        for probe in self.probes:
            record.update(probe.record(self.ranks))
        self.records.log(record)
        self.evaluation.evaluate(self.step)
