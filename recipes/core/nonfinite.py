"""What an optimizer step whose loss or gradient norm is not finite does: stop the run, or skip the step.

`on_nonfinite: stop` (the default) stops at the first such step with exit status 2, before anything of
it is saved, and names the last good checkpoint (Checkpointer.require_finite).

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
before the recipe sees the loss or the gradient norm; the doctor's preflight refuses the combination.
Not with fp16 either: its loss scaler skips overflowing steps itself and must see every step to adapt.
Under fp16 (with `stop`), a step whose loss is finite but whose unscaled gradients overflowed is the
loss scaler's business: it skipped the update and lowered its scale, so the run goes on and the step's
record says `"skipped": true`, like a skipped step above (without the streak limit: a run's first
steps normally overflow while the scale comes down).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from recipes.core.checkpoint import TrainingDiverged, complete_checkpoints
from recipes.core.config import ON_NONFINITE_CHOICES, ConfigError


class NonFiniteSteps:
    """Decides, per optimizer step, whether it is applied; counts skipped steps and stops on a streak."""

    def __init__(self, accelerator: Any, cfg: Any, checkpoints: Any, log=print):
        if cfg.on_nonfinite not in ON_NONFINITE_CHOICES:
            raise ConfigError(
                f"on_nonfinite is {cfg.on_nonfinite!r}; use one of {', '.join(ON_NONFINITE_CHOICES)}"
            )
        self.accelerator, self.checkpoints, self.log = accelerator, checkpoints, log
        self.skip = cfg.on_nonfinite == "skip"
        self.loss_scaled = accelerator.mixed_precision == "fp16"
        self.max_grad_norm = cfg.max_grad_norm
        self.limit = cfg.max_consecutive_skips
        self.skipped_steps = 0
        self.in_a_row = 0
        checkpoints.track(nonfinite=self)  # the counts continue across a resume, as if never interrupted

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped_steps, self.in_a_row = state["skipped_steps"], state["in_a_row"]

    def check(self, model: Any, loss_sum: torch.Tensor) -> tuple[Any, bool]:
        """At the window's synchronising micro-batch: clip to max_grad_norm (when > 0) and return the
        gradient norm and whether this step's update is to be skipped (True on every rank when, on any
        rank, the loss or the gradient norm is not finite; always False with on_nonfinite: stop). With
        skip and no clipping the norm is still measured: clipping to infinity scales by exactly 1."""
        grad_norm = None
        if self.max_grad_norm > 0:
            grad_norm = self.accelerator.clip_grad_norm_(model.parameters(), self.max_grad_norm)
        elif self.skip:
            grad_norm = self.accelerator.clip_grad_norm_(model.parameters(), math.inf)
        if not self.skip:
            return grad_norm, False
        norm = 0.0 if grad_norm is None else float(grad_norm)  # None: DeepSpeed, which skip refuses
        bad = not bool(torch.isfinite(loss_sum)) or not math.isfinite(norm)
        flag = torch.tensor(float(bad), device=self.accelerator.device)
        return grad_norm, self.accelerator.reduce(flag, reduction="sum").item() > 0

    def step_done(self, step: int, loss: float, grad_norm: Any, skipped: bool) -> dict[str, Any]:
        """After the step: stop on a non-finite step (stop) or on too many skipped in a row (skip).
        Returns the fields the step's record gets (skipped steps only)."""
        if not self.skip:
            norm = None if grad_norm is None else float(grad_norm)
            if self.loss_scaled and math.isfinite(loss) and norm is not None and not math.isfinite(norm):
                self.skipped_steps += 1
                self.log(f"step {step}: gradients overflowed in fp16; the loss scaler skipped the update")
                return {"skipped": True, "skipped_steps": self.skipped_steps}
            self.checkpoints.require_finite(step, loss, grad_norm)
            return {}
        if not skipped:
            self.in_a_row = 0
            return {}
        self.skipped_steps += 1
        self.in_a_row += 1
        norm = None if grad_norm is None else float(grad_norm)
        self.log(
            f"step {step}: loss {loss}, grad_norm {norm}: update skipped ({self.skipped_steps} skipped so far, "
            f"{self.in_a_row} in a row; the run stops at {self.limit} in a row)"
        )
        if self.in_a_row >= self.limit:
            complete = complete_checkpoints(self.checkpoints.dir)
            kept = f"the last checkpoint is {complete[-1]}" if complete else "no checkpoint was written"
            raise TrainingDiverged(
                f"training diverged: optimizer steps {step - self.in_a_row + 1} to {step} were all skipped "
                f"(loss {loss}, grad_norm {norm} at step {step}; max_consecutive_skips is {self.limit}); "
                f"{kept}. Lower learning_rate, add warmup, use max_grad_norm > 0 or fp32, and check the "
                "data of these steps"
            )
        return {"skipped": True, "skipped_steps": self.skipped_steps}
