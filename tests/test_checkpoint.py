"""Checkpoints and resume: an interrupted run, resumed, is the uninterrupted run.

The runs are the shared job (helpers.JOB: 6 optimizer steps per epoch, 12 over 2 epochs, checkpoints every
4 steps, so they land mid-epoch) and its reference runs are the uninterrupted ones. A stop signal is sent
where signals matter: Ctrl-C (SIGINT) to one process, and preemption (SIGTERM) to both ranks of a DDP run
whose model has dropout (each rank's dropout draws from its own RNG, which the checkpoint restores to where
the step left it). Every ZeRO stage, each sharding a different part of the state (optimizer states; plus
gradients; plus the parameters themselves under ZeRO-3), resumes from its reference run's checkpoint in
the second epoch. A write that never finished is handled as files, on one process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from helpers import (
    JOB_SAVE_STEPS,
    JOB_STEPS,
    ONE_PROCESS,
    TWO_PROCESSES,
    assert_same_run,
    finish,
    in_process,
    job_args,
    launch,
    make_tiny_decoder,
    resume_copy,
    trained_steps,
    wait_for,
    workers,
)

from recipes.core.exit_status import EXIT_INTERRUPTED
from recipes.core.output.run_dir import MARKER, claim, complete_checkpoints

SAVE_TOTAL_LIMIT = 2
RESUMED_AT = 8  # the reference runs' checkpoint in the second epoch: 2 of its 6 windows done
# ZeRO-1 in fp32 runs DeepSpeed's ZeRO-2 optimizer class and checkpoint layout with unpartitioned gradients.
ZERO = [pytest.param(f"zero{stage}", marks=pytest.mark.slow) for stage in (2, 3)]


@pytest.fixture(scope="module")
def dropout_llama(tmp_path_factory) -> Path:
    return make_tiny_decoder(tmp_path_factory.mktemp("dropout_llama"), attention_dropout=0.1)


def stop_with_signal(config: str, args: list[str], out: Path, log: Path, sig: int, processes: int) -> int:
    """Start the run as a job script would (`recipes launch`), send `sig` to every recipe process once 2
    steps are logged; the step it stopped at, after checking that it finished that step, saved it and
    that the launch exited with EXIT_INTERRUPTED."""
    proc = launch(config, "sft", args, log=log, exit_status=True)
    wait_for(lambda: trained_steps(out) >= 2, proc, log)
    pids = workers(proc, "sft")
    assert len(pids) == processes
    for pid in pids:
        os.kill(pid, sig)
    output = finish(proc, log, expect_ok=False)
    assert proc.returncode == EXIT_INTERRUPTED, output[-4000:]
    stopped = int(re.search(r"stopped by signal after step (\d+)", output).group(1))
    assert 2 <= stopped < JOB_STEPS
    assert (out / f"checkpoint-{stopped}" / MARKER).is_file()
    assert trained_steps(out) == stopped  # the step in progress was finished, nothing after it
    return stopped


def assert_rotated(out: Path, stopped: int) -> None:
    """Exactly the newest save_total_limit complete checkpoints remain."""
    saved = sorted(set(range(JOB_SAVE_STEPS, JOB_STEPS, JOB_SAVE_STEPS)) | {stopped})
    expected = [f"checkpoint-{s}" for s in saved[-SAVE_TOTAL_LIMIT:]]
    assert [p.name for p in complete_checkpoints(out)] == expected


def assert_loads_without_unpickling_objects(checkpoint: Path, deepspeed: bool) -> None:
    """The recipe's own states are weights-only pickles and no Accelerate custom-object pickle exists.
    Outside DeepSpeed (whose engine files DeepSpeed itself reads) every file loads weights-only."""
    # Accelerate's load is torch.load(weights_only=True) plus numpy's array types (for RNG states).
    from accelerate.utils.other import load

    assert not list(checkpoint.glob("custom_checkpoint_*")), sorted(p.name for p in checkpoint.iterdir())
    scheduler = torch.load(checkpoint / "lr_scheduler.pt", weights_only=True)
    assert scheduler["last_epoch"] == json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    if not deepspeed:
        pickles = [p for p in checkpoint.rglob("*") if p.suffix in (".bin", ".pkl", ".pt", ".pth")]
        assert {p.name for p in pickles} >= {"optimizer.bin", "lr_scheduler.pt", "random_states_0.pkl"}
        for path in pickles:
            load(path, map_location="cpu")


@pytest.mark.slow
def test_sigint_on_one_process_checkpoints_exits_75_and_resume_equals_the_uninterrupted_run(
    reference, tiny_llama, tmp_path
):
    out = tmp_path / "run"
    args = job_args(tiny_llama, out, "--save_total_limit", str(SAVE_TOTAL_LIMIT))
    stopped = stop_with_signal(ONE_PROCESS, args, out, tmp_path / "run.log", signal.SIGINT, processes=1)
    assert_loads_without_unpickling_objects(out / f"checkpoint-{stopped}", deepspeed=False)
    in_process("sft", [*args, "--resume_from_checkpoint", "latest"])  # resuming needs no launcher
    assert_same_run(reference("1proc"), out)
    assert_rotated(out, stopped)


@pytest.fixture(scope="module")
def dropout_ddp(dropout_llama, tmp_path_factory) -> Path:
    """The uninterrupted DDP run of the shared job on the model with dropout."""
    out = tmp_path_factory.mktemp("dropout_ddp")
    launch(TWO_PROCESSES, "sft", job_args(dropout_llama, out))
    return out


@pytest.mark.slow
def test_sigterm_on_both_ranks_checkpoints_exits_75_and_resume_with_dropout_equals_the_uninterrupted_run(
    dropout_ddp, dropout_llama, tmp_path
):
    out = tmp_path / "run"
    args = job_args(dropout_llama, out, "--save_total_limit", str(SAVE_TOTAL_LIMIT))
    stopped = stop_with_signal(TWO_PROCESSES, args, out, tmp_path / "run.log", signal.SIGTERM, processes=2)
    assert (out / f"checkpoint-{stopped}" / "random_states_1.pkl").is_file()  # every rank's RNG
    output = launch(TWO_PROCESSES, "sft", [*args, "--resume_from_checkpoint", "latest"]).stdout
    assert f"resumed from {out / f'checkpoint-{stopped}'}: step {stopped}" in output
    assert_same_run(dropout_ddp, out)
    assert_rotated(out, stopped)


@pytest.mark.parametrize("name", ZERO)
def test_zero_run_resumed_from_its_second_epoch_checkpoint_equals_the_uninterrupted_run(
    reference, name, tmp_path
):
    checkpoint = reference(name) / f"checkpoint-{RESUMED_AT}"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_in_epoch"]) == (1, 2 * 2)  # 2 windows of GA 2 on each rank
    assert_loads_without_unpickling_objects(checkpoint, deepspeed=True)
    out = resume_copy(reference(name), RESUMED_AT, tmp_path / "run")
    args = [
        *reference.args(name, resume=True),
        "--output_dir",
        str(out),
        "--resume_from_checkpoint",
        "latest",
    ]
    output = launch(f"accelerate_configs/ds_{name}.yaml", "sft", args).stdout
    assert (
        f"resumed from {out / f'checkpoint-{RESUMED_AT}'}: step {RESUMED_AT}, epoch 1, 4 micro-batches"
        in output
    )
    assert_same_run(reference(name), out)


@pytest.mark.parametrize(
    "name",
    [
        "1proc",
        pytest.param("ddp", marks=pytest.mark.slow),
        pytest.param("zero2", marks=pytest.mark.slow),
    ],
)
def test_a_checkpoint_write_that_never_finished_is_skipped_and_resume_takes_the_last_complete_one(
    reference, name, tmp_path, capsys
):
    """As after a crash (SIGKILL, power loss) during the write of checkpoint-8: the directory is still under
    its temporary name, without the completion marker. Resume names it, takes checkpoint-4 and removes it.
    A matter of files, not of what each backend saves: one process, DDP and ZeRO-2 cover it."""
    out = resume_copy(reference(name), JOB_SAVE_STEPS, tmp_path / "run")
    interrupted = out / f"checkpoint-{2 * JOB_SAVE_STEPS}.partial"
    shutil.copytree(out / f"checkpoint-{JOB_SAVE_STEPS}", interrupted)
    (interrupted / MARKER).unlink()
    (interrupted / "trainer_state.json").write_text(json.dumps({"step": 2 * JOB_SAVE_STEPS}))
    args = [
        *reference.args(name, resume=True),
        "--output_dir",
        str(out),
        "--save_total_limit",
        str(SAVE_TOTAL_LIMIT),
    ]
    args += ["--resume_from_checkpoint", "latest"]
    if name == "1proc":
        capsys.readouterr()
        in_process("sft", args)
        output = capsys.readouterr().out
    else:
        config = TWO_PROCESSES if name == "ddp" else f"accelerate_configs/ds_{name}.yaml"
        output = launch(config, "sft", args).stdout
    assert f"skipping incomplete checkpoint {interrupted} (its write did not finish)" in output
    assert f"resumed from {out / f'checkpoint-{JOB_SAVE_STEPS}'}: step {JOB_SAVE_STEPS}, epoch 0" in output
    assert_same_run(reference(name), out)
    assert not interrupted.exists()
    # checkpoint-8 was written again, now in the second epoch, and both fit the limit of 2
    assert [p.name for p in complete_checkpoints(out)] == [f"checkpoint-{s}" for s in (4, 8)]
    assert json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["epoch"] == 1


# ---------------------------------------------------------------------- output_dir rules, in-process
@pytest.fixture
def run_dir(tmp_path):
    """find_start and Checkpointers for configs writing to one output_dir, on a one-process CPU Accelerator."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from recipes.core.distributed.ranks import Ranks
    from recipes.core.output.checkpoint import Checkpointer
    from recipes.core.output.checkpoint_io import AccelerateIO
    from recipes.core.output.run_dir import find_start
    from recipes.sft import SFTConfig

    accelerator = Accelerator(cpu=True)
    ranks = Ranks.of_accelerator(accelerator)

    def config(**fields) -> SFTConfig:
        return SFTConfig(output_dir=str(tmp_path / "run"), learning_rate=1e-3, **fields)

    def start(**fields):
        return find_start(config(**fields), ranks, log=lambda message: None)

    def checkpointer(**fields) -> Checkpointer:
        io = AccelerateIO(accelerator)
        return Checkpointer(io, ranks, config(**fields), total_steps=100, tracked={}, log=lambda m: None)

    return SimpleNamespace(
        dir=tmp_path / "run", config=config, start=start, checkpointer=checkpointer, ranks=ranks
    )


def test_rotation_keeps_exactly_save_total_limit_complete_checkpoints(run_dir):
    from recipes.core.output.run_dir import Position

    checkpoints = run_dir.checkpointer(save_total_limit=2)
    for step in range(1, 6):
        checkpoints.save(Position(step=step))
        kept = [p.name for p in complete_checkpoints(run_dir.dir)]
        assert kept == [f"checkpoint-{s}" for s in range(max(1, step - 1), step + 1)]


def test_save_total_limit_below_one_is_refused(run_dir):
    from recipes.core.config import ConfigError

    with pytest.raises(ConfigError, match="save_total_limit is 0; it must be at least 1"):
        run_dir.start(save_total_limit=0)


def test_new_run_refuses_an_output_dir_with_another_config_unless_told_to_overwrite(run_dir):
    from recipes.core.config import ConfigError, save_config
    from recipes.core.output.run_dir import Position

    run_dir.checkpointer().save(Position(step=3))
    save_config(run_dir.config(), run_dir.dir / "config.yaml")
    with pytest.raises(
        ConfigError, match=r"holds a run with a different config \(differs in num_train_epochs\)"
    ):
        run_dir.start(num_train_epochs=2.0)
    with pytest.raises(ConfigError, match="already holds checkpoints; pass --resume_from_checkpoint latest"):
        run_dir.start()
    start = run_dir.start(num_train_epochs=2.0, overwrite_output_dir=True)
    assert (start.checkpoint, start.replaces) == (None, True)
    # Nothing is removed while the run's inputs are still being checked; claiming output_dir replaces
    # the old run as a whole.
    assert [p.name for p in complete_checkpoints(run_dir.dir)] == ["checkpoint-3"]
    claim(run_dir.dir, start, run_dir.ranks)
    assert list(run_dir.dir.iterdir()) == []


def test_resume_refuses_an_incomplete_checkpoint_path_and_a_changed_config(run_dir):
    from recipes.core.config import ConfigError
    from recipes.core.output.run_dir import Position

    saved = run_dir.checkpointer().save(Position(step=3, epoch=1, batches_in_epoch=6))
    partial = saved.with_name("checkpoint-4.partial")
    shutil.copytree(saved, partial)
    (partial / MARKER).unlink()
    with pytest.raises(ConfigError, match=r"checkpoint-4.partial is incomplete \(no completion marker\)"):
        run_dir.start(resume_from_checkpoint=str(partial))
    with pytest.raises(ConfigError, match=r"config differs in seed \(seed=42 there\)"):
        run_dir.start(resume_from_checkpoint="latest", seed=7)
    start = run_dir.start(resume_from_checkpoint="latest")
    assert (start.checkpoint, start.position) == (saved, Position(step=3, epoch=1, batches_in_epoch=6))


# ---------------------------------------------------------------------- the classification recipe
@pytest.mark.parametrize("name", ["1proc", pytest.param("ddp", marks=pytest.mark.slow)])
def test_classify_resumed_from_a_checkpoint_equals_the_uninterrupted_run_and_keeps_the_same_best_model(
    classify_reference, name, tmp_path
):
    """Evaluated every 3 steps, so the best model so far (kept in the checkpoint) is older than the
    checkpoint: resume must carry it along; on two processes eval predictions come from both ranks."""
    reference, args = classify_reference(name)
    out = resume_copy(reference, 4, tmp_path / "run")
    resumed = [*args, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    if name == "ddp":
        launch(TWO_PROCESSES, "classify", resumed)
    else:
        in_process("classify", resumed)
    assert_same_run(reference, out)
    ours, theirs = (json.loads((run / "eval_results.json").read_text()) for run in (out, reference))
    assert ours.keys() == theirs.keys() and ours["step"] == theirs["step"] < 8  # the best model is kept
    assert ours == theirs  # the same operations in the same order: the same floats
