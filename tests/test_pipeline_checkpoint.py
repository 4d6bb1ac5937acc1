"""Checkpoints and resume of the pipeline recipe through the real `accelerate launch`: 2 processes are the
2 stages, and an interrupted run, resumed, is the uninterrupted run (the shared job's pipeline references).

The shared job (helpers.JOB) takes 6 optimizer steps per epoch of windows of 4 micro-batches (the last one
2), 12 in all; after step s the position is epoch s // 6 with 4 x (s % 6) micro-batches of it done (a
finished epoch reads as the next one at 0). The stop signal comes once step 7 is logged, so the run stops,
and resumes, in the second epoch, where the sampler's epoch and the batches to skip both matter.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from helpers import (
    JOB_SAVE_STEPS,
    JOB_STEPS,
    JOB_STEPS_PER_EPOCH,
    PIPELINE,
    assert_same_run,
    finish,
    launch,
    resume_copy,
    trained_steps,
    wait_for,
    workers,
)

from recipes.core.exit_status import EXIT_INTERRUPTED
from recipes.core.output.run_dir import MARKER, complete_checkpoints

pytestmark = pytest.mark.slow  # every test launches the pipeline
GA, SAVE_TOTAL_LIMIT, STOP_AFTER = 4, 2, 7


def rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=", 1)[1])


def test_zero1_pipeline_stopped_by_sigterm_to_its_last_stage_exits_75_and_resumes_to_the_uninterrupted_run(
    reference, tmp_path
):
    """ZeRO-1: DeepSpeed clips and saves optimizer shards of its own. Qwen2's tied embeddings: the last
    stage's copy of the embedding is not in any layer file and must come back from the first stage on
    resume. Signalling only the last stage proves the first one (which writes the records) stops with it."""
    name = "pipeline_zero1_qwen2"
    out, log = tmp_path / "run", tmp_path / "run.log"
    args = [*reference.args(name), "--output_dir", str(out), "--save_total_limit", str(SAVE_TOTAL_LIMIT)]
    proc = launch(PIPELINE, "sft_pipeline", args, log=log)
    wait_for(lambda: trained_steps(out) >= STOP_AFTER, proc, log)
    pids = {rank_of(pid): pid for pid in workers(proc, "sft_pipeline")}
    assert sorted(pids) == [0, 1]
    os.kill(pids[1], signal.SIGTERM)
    output = finish(proc, log, expect_ok=False)
    # The stage that exits first has status 75; the launcher then stops the other with SIGTERM, which a
    # stage that was not signalled yet answers with 75 as well (one already signalled would end at once,
    # -15). The checkpoint is complete either way: every rank waits for it before leaving.
    root_cause = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", output, re.DOTALL)
    assert root_cause and root_cause.group(1) == str(EXIT_INTERRUPTED), output[-4000:]
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", output)) <= {str(EXIT_INTERRUPTED), "-15"}
    stopped = int(re.search(r"stopped by signal after step (\d+)", output).group(1))
    assert STOP_AFTER <= stopped < JOB_STEPS
    assert trained_steps(out) == stopped  # the step in progress was finished, nothing after it

    checkpoint = out / f"checkpoint-{stopped}"
    marker = json.loads((checkpoint / MARKER).read_text())
    written = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()} - {MARKER}
    assert marker["step"] == stopped and set(marker["files"]) == written  # every rank's files, checksummed
    assert json.loads((checkpoint / "trainer_state.json").read_text()) == {
        "step": stopped,
        "epoch": stopped // JOB_STEPS_PER_EPOCH,
        "batches_in_epoch": GA * (stopped % JOB_STEPS_PER_EPOCH),
        "num_processes": 2,
    }
    # DeepSpeed's files: the first stage's layers (embedding, decoder layer 0), the last stage's (decoder
    # layer 1, final norm; its tied head has no file of its own) and each stage's engine state.
    layers = {f"layer_0{i}-model_states.pt" for i in range(4)}
    assert layers | {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= {
        p.name for p in (checkpoint / "pytorch_model").iterdir()
    }
    # Nothing of DeepSpeed outside the checkpoints (no `latest` pointer, no recovery scripts): the
    # completion marker says what is usable and rotation removes all of a checkpoint.
    assert {p.name for p in out.iterdir() if not p.name.startswith("checkpoint-")} == {
        "config.yaml",
        "metrics.jsonl",
        "plan.json",
    }
    # What the recipe reads itself loads weights-only: the LR scheduler and every rank's RNG states.
    assert torch.load(checkpoint / "lr_scheduler.pt", weights_only=True)["last_epoch"] == stopped
    for rank in (0, 1):
        assert set(torch.load(checkpoint / f"rng_state_{rank}.pt", weights_only=True)) >= {
            "python",
            "numpy_key",
            "torch",
        }

    reference_run = reference(name)
    output = launch(PIPELINE, "sft_pipeline", [*args, "--resume_from_checkpoint", "latest"]).stdout
    assert f"resumed from {checkpoint}: step {stopped}, epoch {stopped // JOB_STEPS_PER_EPOCH}" in output
    assert_same_run(reference_run, out)
    saved = sorted(set(range(JOB_SAVE_STEPS, JOB_STEPS, JOB_SAVE_STEPS)) | {stopped})
    assert [p.name for p in complete_checkpoints(out)] == [
        f"checkpoint-{s}" for s in saved[-SAVE_TOTAL_LIMIT:]
    ]


def test_zero0_pipeline_resumed_from_its_second_epoch_checkpoint_equals_the_uninterrupted_run(
    reference, tmp_path
):
    """ZeRO-0: the recipe clips and DeepSpeed saves each stage's optimizer with its layers."""
    resumed_at = 8
    out = resume_copy(reference("pipeline"), resumed_at, tmp_path / "run")
    args = [*reference.args("pipeline"), "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    output = launch(PIPELINE, "sft_pipeline", args).stdout
    assert (
        f"resumed from {out / f'checkpoint-{resumed_at}'}: step {resumed_at}, epoch 1, 8 micro-batches"
        in output
    )
    assert_same_run(reference("pipeline"), out)
