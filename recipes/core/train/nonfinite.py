"""What an optimizer step whose loss or gradient norm is not finite does: stop the run, or skip the step.

`on_nonfinite: stop` (the default) stops at the first such step with exit status 2, before anything of
it is saved, and names the last good checkpoint (`require_finite`).

`on_nonfinite: skip` checks at the window's last micro-batch, after the gradients are synchronised and
before the optimizer steps: when the loss or the gradient norm is not finite on any rank (a flag
all-reduced once per step, so every rank takes the same decision), the gradients are zeroed and the
optimizer is not stepped, so weights and optimizer state stay exactly as they were. The LR scheduler
still advances and the step still counts, so the number of steps and the LR of every later step stay
as the plan printed them. The step's metrics.jsonl record carries `"skipped": true` and
`"skipped_steps"` (the run's total so far; both counts are checkpointed). After `max_consecutive_skips` skipped steps in a row the run
stops as with `stop`: a model that keeps producing non-finite values is not recovering.

The gradient norm is computed for the check even with max_grad_norm 0 (it is then not clipped, only
measured and logged), because a step can overflow in its gradients while its loss is finite.

Not under DeepSpeed: Accelerate's DeepSpeed backward runs engine.step() itself, so the update is applied
before the recipe sees the loss or the gradient norm; the doctor's preflight refuses the combination
(and an unknown on_nonfinite value: the rule lives there).
Not with fp16 either: its loss scaler skips overflowing steps itself and must see every step to adapt.
Under fp16 (with `stop`), a step whose loss is finite but whose unscaled gradients overflowed is the
loss scaler's business: it skipped the update and lowered its scale, so the run goes on and the step's
record says `"skipped": true`, like a skipped step above (without the streak limit: a run's first
steps normally overflow while the scale comes down).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from recipes.core.distributed.ranks import Ranks
from recipes.core.errors import RunStopped
from recipes.core.output.run_dir import complete_checkpoints


class TrainingDiverged(RunStopped):
    """The loss or gradient norm stopped being finite; usually the learning rate or precision is wrong."""


def require_finite(step: int, loss: float, grad_norm: Any, output_dir: str | Path) -> None:
    """Stop at the first non-finite loss or gradient norm, before anything of that step is saved."""
    norm = None if grad_norm is None else float(grad_norm)
    if math.isfinite(loss) and (norm is None or math.isfinite(norm)):
        return
    raise TrainingDiverged(
        f"training diverged at optimizer step {step}: loss {loss}, grad_norm {norm}; nothing of this "
        f"step was saved and {_last_checkpoint(output_dir, 'the last good')}. Lower learning_rate, add warmup, use "
        "max_grad_norm > 0 or fp32, and check the data of this step"
    )


class NonFiniteSteps:
    """Decides, per optimizer step, whether it is applied; counts skipped steps and stops on a streak.

    Checkpointed with the run (state_dict), so the counts continue across a resume as if never interrupted.
    """

    def __init__(self, cfg: Any, ranks: Ranks, *, loss_scaled: bool, log=print):
        """`loss_scaled`: fp16 training, whose loss scaler skips overflowing steps itself."""
        self.ranks, self.log, self.loss_scaled = ranks, log, loss_scaled
        self.skip = cfg.on_nonfinite == "skip"
        self.limit = cfg.max_consecutive_skips
        self.output_dir = cfg.output_dir
        # Clipping to infinity scales by exactly 1: with skip and no clipping the norm is still measured.
        self.clip_norm: float | None = cfg.max_grad_norm if cfg.max_grad_norm > 0 else None
        if self.clip_norm is None and self.skip:
            self.clip_norm = math.inf
        self.skipped_steps = 0
        self.in_a_row = 0

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped_steps, self.in_a_row = state["skipped_steps"], state["in_a_row"]

    def skip_update(self, loss_sum: torch.Tensor, grad_norm: Any) -> bool:
        """At the window's synchronising micro-batch: whether this step's update is dropped. True on every
        rank when, on any rank, the loss or the gradient norm is not finite; always False with stop."""
        if not self.skip:
            return False
        norm = 0.0 if grad_norm is None else float(grad_norm)  # None: DeepSpeed, which skip refuses
        return self.ranks.any(not bool(torch.isfinite(loss_sum)) or not math.isfinite(norm))

    def step_done(self, step: int, loss: float, grad_norm: Any, skipped: bool) -> dict[str, Any]:
        """After the step: stop on a non-finite step (stop) or on too many skipped in a row (skip).
        Returns the fields the step's record gets (skipped steps only)."""
        norm = None if grad_norm is None else float(grad_norm)
        if not self.skip:
            if self.loss_scaled and math.isfinite(loss) and norm is not None and not math.isfinite(norm):
                self.skipped_steps += 1
                self.log(f"step {step}: gradients overflowed in fp16; the loss scaler skipped the update")
                return {"skipped": True, "skipped_steps": self.skipped_steps}
            require_finite(step, loss, grad_norm, self.output_dir)
            return {}
        if not skipped:
            self.in_a_row = 0
            return {}
        self.skipped_steps += 1
        self.in_a_row += 1
        self.log(
            f"step {step}: loss {loss}, grad_norm {norm}: update skipped ({self.skipped_steps} skipped so far, "
            f"{self.in_a_row} in a row; the run stops at {self.limit} in a row)"
        )
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(
                f"training diverged: optimizer steps {step - self.in_a_row + 1} to {step} were all skipped "
                f"(loss {loss}, grad_norm {norm} at step {step}; max_consecutive_skips is {self.limit}); "
                f"{_last_checkpoint(self.output_dir, 'the last')}. Lower "
                "learning_rate, add warmup, use max_grad_norm > 0 or fp32, and check the data of these steps"
            )
        return {"skipped": True, "skipped_steps": self.skipped_steps}


def _last_checkpoint(output_dir: str | Path, which: str) -> str:
    complete = complete_checkpoints(output_dir)
    return f"{which} checkpoint is {complete[-1]}" if complete else "no checkpoint was written"
