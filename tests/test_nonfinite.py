"""fp16's loss scaler owns overflowing steps: with on_nonfinite: stop, an overflow of the unscaled
gradients under a finite loss is recorded as skipped and the run goes on; a non-finite loss still stops.

fp16 needs a GPU, so the decision is tested on its own (the run's precision tells it that a loss scaler
is at work); the skipping itself is torch's GradScaler, exercised wherever fp16 runs.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from recipes.core.train.nonfinite import NonFiniteSteps, TrainingDiverged


def steps(precision: str, tmp_path) -> NonFiniteSteps:
    cfg = SimpleNamespace(
        on_nonfinite="stop", max_grad_norm=1.0, max_consecutive_skips=5, output_dir=str(tmp_path)
    )
    return NonFiniteSteps(cfg, ranks=None, loss_scaled=precision == "fp16", log=lambda *_: None)


def test_fp16_overflow_is_the_loss_scaler_skip_and_training_goes_on(tmp_path):
    fp16 = steps("fp16", tmp_path)
    assert fp16.step_done(1, 2.5, math.inf, skipped=False) == {"skipped": True, "skipped_steps": 1}
    assert fp16.step_done(2, 2.4, math.nan, skipped=False) == {"skipped": True, "skipped_steps": 2}
    assert fp16.step_done(3, 2.3, 0.7, skipped=False) == {}


def test_fp16_non_finite_loss_and_fp32_overflow_still_stop(tmp_path):
    with pytest.raises(TrainingDiverged, match="step 4"):
        steps("fp16", tmp_path).step_done(4, math.inf, math.inf, skipped=False)
    with pytest.raises(TrainingDiverged, match="step 5"):
        steps("no", tmp_path).step_done(5, 2.5, math.inf, skipped=False)
