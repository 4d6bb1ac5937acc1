"""Bad input stops the SFT recipe with status 2 and one paragraph naming the problem and the fix, without a
library traceback and without leaving a partial checkpoint behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import SFT_DATA, launch

from recipes.core.checkpoint import complete_checkpoints, incomplete_checkpoints
from recipes.core.errors import EXIT_USER_ERROR

pytestmark = pytest.mark.slow  # each test launches the recipe


def sft(model: Path, output_dir: Path, *extra: str):
    args = [
        "--config",
        "recipes/configs/sft_smollm2.yaml",
        "--model_name_or_path",
        str(model),
        "--dataset_name",
        str(SFT_DATA),
        "--output_dir",
        str(output_dir),
        "--max_train_samples",
        "8",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--max_seq_length",
        "64",
        "--eval_split",
        "null",
        "--report_to",
        "none",
        *extra,
    ]
    return launch(None, "recipes/sft.py", args, check=False)


def assert_user_error(result, message: str) -> str:
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-4000:]
    assert f"error: {message}" in result.stderr, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    return result.stderr


def assert_no_partial_checkpoint(output_dir: Path) -> None:
    assert not output_dir.exists() or incomplete_checkpoints(output_dir) == []


def test_model_path_that_does_not_exist(tmp_path):
    missing, out = tmp_path / "no_such_model", tmp_path / "out"
    result = sft(missing, out)
    assert_user_error(result, f"model_name_or_path {missing} does not exist as a local directory")
    assert "pass the directory of a saved model or a Hub id" in result.stderr
    assert_no_partial_checkpoint(out)


def test_dataset_too_small_for_one_optimizer_step(tiny_llama, tmp_path):
    # 1 sample, micro batch 2 and drop_last: no full batch, so not one optimizer step
    out = tmp_path / "out"
    result = sft(tiny_llama, out, "--max_train_samples", "1", "--dataloader_drop_last", "true")
    assert_user_error(
        result,
        f"{SFT_DATA}: 1 training samples give no batch on each of 1 data-parallel ranks at "
        "per_device_train_batch_size 2 with drop_last; provide at least 2 samples",
    )
    assert_no_partial_checkpoint(out)


def test_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tiny_llama, tmp_path):
    # Step 1 moves every weight by about the learning rate (Adam), 1e30: step 2's activations overflow.
    out = tmp_path / "out"
    args = [
        "--learning_rate",
        "1e30",
        "--warmup_steps",
        "0",
        "--warmup_ratio",
        "0",
        "--save_steps",
        "1",
        "--max_steps",
        "4",
    ]
    result = sft(tiny_llama, out, *args)
    assert_user_error(result, "training diverged at optimizer step 2: loss nan")
    assert f"the last good checkpoint is {out / 'checkpoint-1'}" in result.stderr
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1"]
    assert_no_partial_checkpoint(out)
    assert not (out / "final").exists()


def test_output_dir_that_cannot_be_written(tiny_llama, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "run"  # a directory cannot be made under a regular file
    result = sft(tiny_llama, out)
    assert_user_error(result, f"output_dir {out} is not writable (Not a directory)")
    assert blocker.read_text() == ""


def test_failed_checkpoint_write_keeps_the_previous_checkpoint_which_resume_uses(tiny_llama, tmp_path):
    # A regular file where step 2's checkpoint is to be written makes that write fail like a full disk.
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-2.partial").write_text("")
    args = ["--save_steps", "1", "--max_steps", "3"]
    result = sft(tiny_llama, out, *args)
    assert_user_error(result, f"writing checkpoint {out / 'checkpoint-2'} failed at step 2 (")
    assert f"the previous checkpoint {out / 'checkpoint-1'} is intact" in result.stderr
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1"]

    (out / "checkpoint-2.partial").unlink()
    resumed = sft(tiny_llama, out, *args, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {out / 'checkpoint-1'}: step 1" in resumed.stdout
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert (out / "final" / "model.safetensors").is_file()
