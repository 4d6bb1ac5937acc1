"""Checkpoints and resume of the pipeline recipe through the real `accelerate launch`: 2 processes are the
2 stages of a tied-embedding Llama, and an interrupted run, resumed, is the uninterrupted run.

46 samples at micro batch 2 make 23 batches; GA 3 gives windows 3,3,3,3,3,3,3,2 = 8 optimizer steps per
epoch, 24 over 3 epochs. After step s the position is epoch s // 8 with 3 x (s % 8) micro-batches of it
done (a finished epoch reads as the next one at 0). Checkpoints every 4 steps, the newest 2 kept; the stop
signal comes once step 9 is logged, so the run stops, and resumes, after the first epoch (mostly in the
middle of the second one), where the sampler's epoch and the batches to skip both matter.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from helpers import SFT_DATA, make_tiny_decoder
from test_checkpoint import assert_same_run, finish, start, trained_steps, wait_for, workers

from recipes.core.run_dir import MARKER, complete_checkpoints
from recipes.core.stop_signal import EXIT_INTERRUPTED

PIPELINE, SCRIPT = "accelerate_configs/pipeline_2proc.yaml", "recipes/sft_pipeline.py"
STEPS_PER_EPOCH, GA, TOTAL = 8, 3, 24
SAVE_STEPS, SAVE_TOTAL_LIMIT, STOP_AFTER = 4, 2, 9
# name: (DeepSpeed config, which ranks get SIGTERM). ZeRO-0: the recipe clips and DeepSpeed saves each
# stage's optimizer with its layers; ZeRO-1: DeepSpeed clips and saves optimizer shards of its own.
# Signalling only the last stage proves the first one (which writes the records) stops with it.
SETUPS = {
    "zero0_both_stages_signalled": ("ds_configs/pipeline.json", (0, 1)),
    "zero1_last_stage_signalled": ("ds_configs/zero1.json", (1,)),
}


def recipe_args(model: Path, output_dir: Path, deepspeed_config: str, *extra: str) -> list[str]:
    return [
        "--config", "recipes/configs/sft_pipeline_smollm2.yaml", "--model_name_or_path", str(model),
        "--dataset_name", str(SFT_DATA), "--output_dir", str(output_dir), "--deepspeed_config", deepspeed_config,
        "--max_train_samples", "46", "--per_device_train_batch_size", "2", "--global_batch_size", "null",
        "--gradient_accumulation_steps", str(GA), "--num_train_epochs", "3", "--warmup_steps", "3",
        "--max_seq_length", "96", "--learning_rate", "1e-3", "--max_eval_samples", "8", "--eval_steps", "10",
        *extra,
    ]  # fmt: skip


def rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=", 1)[1])


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """Tied embeddings: the last stage's copy of the embedding is not in any layer file and must come back
    from the first stage on resume."""
    return make_tiny_decoder(tmp_path_factory.mktemp("tied_llama"), "llama_tied")


@pytest.mark.slow
@pytest.mark.parametrize("name", SETUPS)
def test_pipeline_stopped_by_sigterm_exits_75_and_resumes_to_the_uninterrupted_run(
    name, tied_llama, tmp_path
):
    ds_config, signalled = SETUPS[name]
    reference, log = tmp_path / "A", tmp_path / "A.log"
    finish(start(PIPELINE, recipe_args(tied_llama, reference, ds_config), log, SCRIPT), log)
    assert trained_steps(reference) == TOTAL

    out, log = tmp_path / "B", tmp_path / "B1.log"
    saving = ["--save_steps", str(SAVE_STEPS), "--save_total_limit", str(SAVE_TOTAL_LIMIT)]
    args = recipe_args(tied_llama, out, ds_config, *saving)
    proc = start(PIPELINE, args, log, SCRIPT)
    wait_for(lambda: trained_steps(out) >= STOP_AFTER, proc, log)
    pids = {rank_of(pid): pid for pid in workers(proc)}
    assert sorted(pids) == [0, 1]
    for rank in signalled:
        os.kill(pids[rank], signal.SIGTERM)
    output = finish(proc, log, expect_ok=False)
    # The first stage to exit has status 75; the launcher then stops the other with SIGTERM, which ends a
    # stage already signalled at once (-15) and one that was not with 75 as well. The checkpoint is
    # complete either way: every rank waits for it before leaving.
    root_cause = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", output, re.DOTALL)
    assert root_cause and root_cause.group(1) == str(EXIT_INTERRUPTED), output[-4000:]
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", output)) <= {str(EXIT_INTERRUPTED), "-15"}
    stopped = int(re.search(r"stopped by signal after step (\d+)", output).group(1))
    assert STOP_AFTER <= stopped < TOTAL
    assert trained_steps(out) == stopped  # the step in progress was finished, nothing after it

    checkpoint = out / f"checkpoint-{stopped}"
    assert json.loads((checkpoint / MARKER).read_text()) == {"step": stopped}
    assert json.loads((checkpoint / "trainer_state.json").read_text()) == {
        "step": stopped,
        "epoch": stopped // STEPS_PER_EPOCH,
        "batches_in_epoch": GA * (stopped % STEPS_PER_EPOCH),
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

    log = tmp_path / "B2.log"
    output = finish(start(PIPELINE, [*args, "--resume_from_checkpoint", "latest"], log, SCRIPT), log)
    assert f"resumed from {checkpoint}: step {stopped}, epoch {stopped // STEPS_PER_EPOCH}" in output
    assert_same_run(reference, out)
    saved = sorted(set(range(SAVE_STEPS, TOTAL, SAVE_STEPS)) | {stopped})
    assert [p.name for p in complete_checkpoints(out)] == [
        f"checkpoint-{s}" for s in saved[-SAVE_TOTAL_LIMIT:]
    ]
