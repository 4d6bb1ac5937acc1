"""Checkpoints damaged after they were written, and resume requests on runs without one.

A checkpoint marked complete can be damaged later (a full disk, a copy cut short). Resume checks the files
against the sizes and checksums its marker recorded before anything is loaded or written: a damaged latest
checkpoint is passed over, with a warning naming the file, for the newest intact one (the resumed run then
equals the uninterrupted one); with none intact the run stops with exit status 2 and output_dir unchanged.
`latest` never trains a finished run again, and starts over a run that stopped before its first checkpoint.
Every kind of damage on one process, in this process; a sharded run (FSDP2) launched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import (
    JOB_SAVE_STEPS,
    assert_same_run,
    in_process,
    job_args,
    launch,
    read_jsonl,
    resume_copy,
)

from recipes.core.errors import EXIT_USER_ERROR, USER_ERRORS
from recipes.core.output.integrity import find_damage
from recipes.core.output.run_dir import MARKER, STATE_FILE

LATEST = 2 * JOB_SAVE_STEPS  # the shared job's checkpoints: 4 and 8


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def largest(checkpoint: Path, pattern: str) -> Path:
    return max(checkpoint.glob(pattern), key=lambda p: p.stat().st_size)


# kind -> (how to damage a checkpoint, the file it damages, what the warning says of it)
DAMAGE = {
    "truncated weights": (lambda c: truncate(c / "model.safetensors"), "model.safetensors", "bytes where"),
    "truncated optimizer state": (lambda c: truncate(c / "optimizer.bin"), "optimizer.bin", "bytes where"),
    "empty trainer state": (lambda c: (c / STATE_FILE).write_text(""), STATE_FILE, "bytes where"),
    "invalid trainer state": (
        lambda c: (c / STATE_FILE).write_text((c / STATE_FILE).read_text().replace("{", "[", 1)),
        STATE_FILE,
        "does not parse",
    ),
    "missing file": (lambda c: (c / "random_states_0.pkl").unlink(), "random_states_0.pkl", "is missing"),
    "changed byte": (lambda c: flip_last_byte(c / "model.safetensors"), "model.safetensors", "SHA-256"),
}


def snapshot(directory: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None for p in directory.rglob("*")
    }


def resume(reference, out: Path, capsys) -> str:
    capsys.readouterr()
    in_process(
        "sft", [*reference.args("1proc"), "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    )
    return capsys.readouterr().out


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_latest_checkpoint_is_passed_over_and_the_run_resumes_from_the_one_before(
    reference, kind, tmp_path, capsys
):
    damage, name, problem = DAMAGE[kind]
    out = resume_copy(reference("1proc"), LATEST, tmp_path / "run")
    damage(out / f"checkpoint-{LATEST}")
    output = resume(reference, out, capsys)
    warning = f"warning: checkpoint {out / f'checkpoint-{LATEST}'} is damaged ({name} "
    assert warning in output and problem in output.split(warning)[1].splitlines()[0]
    assert f"resumed from {out / f'checkpoint-{JOB_SAVE_STEPS}'}: step {JOB_SAVE_STEPS}, epoch 0" in output
    assert_same_run(reference("1proc"), out)


def test_with_no_intact_checkpoint_resume_stops_and_leaves_output_dir_as_it_was(reference, tmp_path):
    out = resume_copy(reference("1proc"), LATEST, tmp_path / "run")
    truncate(out / f"checkpoint-{LATEST}" / "optimizer.bin")
    (out / f"checkpoint-{JOB_SAVE_STEPS}" / STATE_FILE).write_text("")
    before = snapshot(out)
    with pytest.raises(USER_ERRORS) as err:
        in_process(
            "sft", [*reference.args("1proc"), "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
        )
    assert str(err.value).startswith(
        f"no intact checkpoint to resume from ({out / f'checkpoint-{LATEST}'}: optimizer.bin has "
    )
    assert f"{out / f'checkpoint-{JOB_SAVE_STEPS}'}: {STATE_FILE} has 0 bytes where " in str(err.value)
    assert str(err.value).endswith("or start over with --overwrite_output_dir true")
    assert snapshot(out) == before  # the records after step 8 too


def test_a_damaged_checkpoint_named_by_its_path_is_refused(reference, tmp_path):
    out = resume_copy(reference("1proc"), LATEST, tmp_path / "run")
    chosen = out / f"checkpoint-{JOB_SAVE_STEPS}"
    truncate(chosen / "model.safetensors")
    before = snapshot(out)
    with pytest.raises(
        USER_ERRORS, match=rf"\({chosen}: model.safetensors has [\d,]+ bytes where [\d,]+ were"
    ):
        in_process(
            "sft",
            [*reference.args("1proc"), "--output_dir", str(out), "--resume_from_checkpoint", str(chosen)],
        )
    assert snapshot(out) == before


def test_a_checkpoint_from_before_the_checksums_is_checked_by_format(reference, tmp_path, capsys):
    """A marker without file records (as older checkpoints have): a file cut short still fails to parse."""
    out = resume_copy(reference("1proc"), LATEST, tmp_path / "run")
    for checkpoint in (out / f"checkpoint-{s}" for s in (JOB_SAVE_STEPS, LATEST)):
        (checkpoint / MARKER).write_text(json.dumps({"step": int(checkpoint.name.split("-")[1])}) + "\n")
    assert find_damage(out / f"checkpoint-{LATEST}", MARKER, STATE_FILE) is None
    truncate(out / f"checkpoint-{LATEST}" / "optimizer.bin")
    output = resume(reference, out, capsys)
    assert "is damaged (optimizer.bin does not parse (" in output
    assert_same_run(reference("1proc"), out)


# ---------------------------------------------------------------------- resume without a checkpoint
def no_checkpoint_args(model: Path, out: Path) -> list[str]:
    return job_args(model, out, "--save_steps", "0", "--resume_from_checkpoint", "latest")


@pytest.fixture(scope="module")
def finished_without_checkpoint(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    in_process("sft", job_args(tiny_llama, out, "--save_steps", "0"))
    return out


def test_latest_on_a_finished_run_without_checkpoint_stops_and_changes_nothing(
    tiny_llama, finished_without_checkpoint, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(finished_without_checkpoint, out)
    before = snapshot(out)
    with pytest.raises(USER_ERRORS) as err:
        in_process("sft", no_checkpoint_args(tiny_llama, out))
    assert str(err.value) == (
        f"--resume_from_checkpoint latest: the run in {out} finished (its model is in {out / 'final'}) and "
        "left no checkpoint to resume, so there is nothing to continue; pick another --output_dir for a new "
        "run, or pass --overwrite_output_dir true (without resume_from_checkpoint) to train this one again"
    )
    assert snapshot(out) == before


def test_latest_on_a_run_stopped_before_its_first_checkpoint_starts_it_over(
    tiny_llama, finished_without_checkpoint, tmp_path, capsys
):
    """What a run killed before its first checkpoint leaves: its config, plan and first records, no model."""
    out = tmp_path / "run"
    shutil.copytree(finished_without_checkpoint, out)
    shutil.rmtree(out / "final")
    (out / "curves.png").unlink()
    records = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(records[:3]) + "\n")
    capsys.readouterr()
    in_process("sft", no_checkpoint_args(tiny_llama, out))
    assert (
        f"no complete checkpoint in {out}: the run there stopped before its first one, so it starts over "
        "at step 0" in capsys.readouterr().out
    )
    assert_same_run(finished_without_checkpoint, out)


def test_latest_on_an_empty_output_dir_starts_at_step_0(tiny_llama, tmp_path, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    in_process("sft", [*no_checkpoint_args(tiny_llama, out), "--max_steps", "2", "--warmup_steps", "1"])
    assert f"no checkpoint in {out} yet: starting at step 0" in capsys.readouterr().out
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2]


# ---------------------------------------------------------------------- a sharded run
@pytest.mark.slow
def test_fsdp2_resume_passes_over_a_damaged_shard_and_stops_with_exit_2_when_none_is_intact(
    reference, tmp_path
):
    """FSDP2 writes each rank's shards into files of their own: every kind of damage to them is found, a
    damaged latest checkpoint is passed over, and with none intact the launch exits 2 changing nothing."""
    reference_run = reference("fsdp2")
    checkpoint = reference_run / f"checkpoint-{LATEST}"
    shards = {
        "truncated model shard": (truncate, largest(checkpoint, "model/*.safetensors"), "bytes where"),
        "truncated optimizer shard": (
            truncate,
            largest(checkpoint, "optimizer/*.safetensors"),
            "bytes where",
        ),
        "missing optimizer shard": (
            Path.unlink,
            largest(checkpoint, "optimizer/*.safetensors"),
            "is missing",
        ),
        "changed byte": (flip_last_byte, largest(checkpoint, "model/*.safetensors"), "SHA-256"),
        "invalid param groups": (
            lambda p: p.write_text("{"),
            checkpoint / "optimizer_param_groups.json",
            "bytes",
        ),
    }
    for kind, (damage, path, problem) in shards.items():
        copy = tmp_path / kind.replace(" ", "_")
        shutil.copytree(checkpoint, copy)
        name = path.relative_to(checkpoint).as_posix()
        damage(copy / name)
        found = find_damage(copy, MARKER, STATE_FILE)
        assert found.startswith(f"{name} ") and problem in found, (kind, found)

    def resume_args(out: Path) -> list[str]:
        return [*reference.args("fsdp2"), "--output_dir", str(out), "--resume_from_checkpoint", "latest"]

    out = resume_copy(reference_run, LATEST, tmp_path / "run")
    truncate(largest(out / f"checkpoint-{LATEST}", "model/*.safetensors"))
    output = launch("accelerate_configs/fsdp2.yaml", "sft", resume_args(out)).stdout
    assert f"warning: checkpoint {out / f'checkpoint-{LATEST}'} is damaged (model/" in output
    assert f"resumed from {out / f'checkpoint-{JOB_SAVE_STEPS}'}: step {JOB_SAVE_STEPS}" in output
    assert_same_run(reference_run, out)

    out = resume_copy(reference_run, LATEST, tmp_path / "none_intact")
    for step in (JOB_SAVE_STEPS, LATEST):
        truncate(largest(out / f"checkpoint-{step}", "optimizer/*.safetensors"))
    before = snapshot(out)
    result = launch("accelerate_configs/fsdp2.yaml", "sft", resume_args(out), check=False, exit_status=True)
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-3000:]
    assert result.stderr.count("error: no intact checkpoint to resume from") == 1
    assert snapshot(out) == before
