"""A disk that fills up during a checkpoint write: the run stops with a clear error at that step, the
previous checkpoint stays complete and loadable, and the run continues from it once there is space.

The disk is a real one: a tmpfs with room for one checkpoint and a half, mounted for the test. Mounting
needs root (or CAP_SYS_ADMIN); elsewhere the test says so and is skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from helpers import SFT_DATA, in_process, read_jsonl

from recipes.core.output.checkpoint import CheckpointWriteFailed

pytestmark = pytest.mark.slow  # mounting the small disk is a process

CHECKPOINT_ROOM = 1.5  # checkpoints that fit: the first one, and half of the second


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()

    def mount(size_bytes: int):
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"mounting a small tmpfs needs root: {result.stderr.strip()}")
        return mount_point

    yield mount
    subprocess.run(["umount", "--lazy", str(mount_point)], capture_output=True)


def args(model, output_dir, *extra):
    return [
        "--config", "recipes/configs/sft_smollm2.yaml", "--model_name_or_path", str(model),
        "--dataset_name", str(SFT_DATA), "--output_dir", str(output_dir), "--max_train_samples", "24",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--max_steps", "6",
        "--max_seq_length", "64", "--eval_split", "null", "--logging_steps", "1", "--save_steps", "2",
        "--save_total_limit", "1", "--learning_rate", "1e-3", "--report_to", "none", *extra,
    ]  # fmt: skip


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_resume_continues(
    tiny_llama, tmp_path, small_disk
):
    # How much one checkpoint of this run takes, measured on a roomy disk.
    roomy = tmp_path / "roomy"
    in_process("sft", args(tiny_llama, roomy))
    checkpoint_bytes = sum(f.stat().st_size for f in (roomy / "checkpoint-4").rglob("*") if f.is_file())
    disk = small_disk(int(CHECKPOINT_ROOM * checkpoint_bytes) + 64 * 1024)  # + records and config
    out = disk / "run"

    # The error a launched recipe prints as `error: <message>` with exit status 2 (test_bad_input).
    with pytest.raises(CheckpointWriteFailed) as err:
        in_process("sft", args(tiny_llama, out))
    message = str(err.value)
    assert message.startswith(f"writing checkpoint {out}/checkpoint-4 failed at step 4 (")
    assert re.search(
        rf"[\d.]+ MiB free in {re.escape(str(out))}\); the previous checkpoint {out}/checkpoint-2 is intact",
        message,
    )
    # The failed write left nothing behind; the previous checkpoint is complete and says where it stands.
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batches_in_epoch"]) == (2, 0, 2)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]

    # Nothing is lost: with space again, the run continues from checkpoint-2 to the end.
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    in_process("sft", args(tiny_llama, moved, "--resume_from_checkpoint", "latest"))
    resumed = [r for r in read_jsonl(moved / "metrics.jsonl") if "loss" in r]
    uninterrupted = [r for r in read_jsonl(roomy / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"], (a, b)  # the same operations in the same order
