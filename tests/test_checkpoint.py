"""Checkpoints and resume through the real `accelerate launch`: an interrupted run, resumed, is the
uninterrupted run.

46 samples at micro batch 2 make 23 batches. One process with GA 3: windows 3,3,3,3,3,3,3,2 = 8 steps
per epoch, 16 over 2 epochs. Two processes: 12 batches per rank, GA 2 = 6 steps per epoch, 12 in all.
Checkpoints every 4 steps, so most land mid-epoch; a SIGTERM lands on whatever step is running.
Every ZeRO stage is resumed: each shards a different part of the state (optimizer states; plus
gradients; plus the parameters themselves under ZeRO-3).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    SFT_DATA,
    free_port,
    load_weights,
    make_tiny_decoder,
    max_weight_diff,
    offline_env,
    read_jsonl,
)

from recipes.core.run_dir import MARKER, complete_checkpoints
from recipes.core.stop_signal import EXIT_INTERRUPTED

ONE_PROCESS, TWO_PROCESSES = "accelerate_configs/cpu.yaml", "accelerate_configs/cpu_2proc.yaml"
DROPOUT = "2proc_ddp_ga2_dropout"  # the one setup whose model has dropout
# name: (accelerate config, GA, total steps worked out by hand as in the module docstring)
SETUPS = {
    "1proc_ga3": (ONE_PROCESS, 3, 16),
    "2proc_ddp_ga2": (TWO_PROCESSES, 2, 12),
    "2proc_zero2_ga2": ("accelerate_configs/ds_zero2.yaml", 2, 12),
    "2proc_zero1_ga2": ("accelerate_configs/ds_zero1.yaml", 2, 12),
    "2proc_zero3_ga2": ("accelerate_configs/ds_zero3.yaml", 2, 12),
    # Dropout draws from each rank's RNG, which the checkpoint restores to where the step left it.
    DROPOUT: (TWO_PROCESSES, 2, 12),
}
# Ctrl-C (SIGINT) and preemption (SIGTERM) take the same path; each setup is stopped by one of them.
STOP_SIGNAL = {name: signal.SIGTERM for name in SETUPS} | {"1proc_ga3": signal.SIGINT}
LAUNCHED = [pytest.param(name, marks=pytest.mark.slow) for name in SETUPS]
# A write killed half-way is a matter of files, not of what the backend saves: three setups cover it.
KILLED = [
    pytest.param(name, marks=pytest.mark.slow) for name in ("1proc_ga3", "2proc_ddp_ga2", "2proc_zero2_ga2")
]
SAVE_STEPS, SAVE_TOTAL_LIMIT = 4, 2


def recipe_args(model: Path, output_dir: Path, ga: int, *extra: str) -> list[str]:
    return [
        "--config",
        "recipes/configs/sft_smollm2.yaml",
        "--model_name_or_path",
        str(model),
        "--dataset_name",
        str(SFT_DATA),
        "--output_dir",
        str(output_dir),
        "--max_train_samples",
        "46",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        str(ga),
        "--num_train_epochs",
        "2",
        "--warmup_steps",
        "3",
        "--max_seq_length",
        "96",
        "--learning_rate",
        "1e-3",
        "--max_eval_samples",
        "8",
        "--report_to",
        "none",
        *extra,
    ]


def start(
    accelerate_config: str, args: list[str], log: Path, script: str = "recipes/sft.py"
) -> subprocess.Popen:
    """`accelerate launch` in its own session, so the test can signal exactly its processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / accelerate_config)]
    cmd += ["--main_process_port", str(free_port()), str(REPO / script), *args]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, **offline_env()},
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, log: Path, expect_ok: bool = True) -> str:
    proc.wait(timeout=600)
    output = log.read_text()
    if expect_ok:
        assert proc.returncode == 0, output[-6000:]
    return output


def descendants(pid: int) -> list[int]:
    """All processes under `pid` (the workers of a multi-process launch run in sessions of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def workers(launcher: subprocess.Popen) -> list[int]:
    """The recipe processes under the launcher (the launcher itself is not signalled)."""
    pids = []
    for pid in descendants(launcher.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        recipes = (b"recipes/sft.py", b"recipes/classify.py", b"recipes/sft_pipeline.py")
        if any(part.endswith(recipes) for part in cmdline[:3]):
            pids.append(pid)
    return pids


def wait_for(condition, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        assert proc.poll() is None, f"run ended before the interruption point:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.01)


def trained_steps(output_dir: Path) -> int:
    path = output_dir / "metrics.jsonl"
    records = read_jsonl(path) if path.is_file() else []
    return max([r["step"] for r in records if "loss" in r], default=0)


# Timings and memory of a run, which no two runs share.
MEASURED = {"step_time", "train_runtime", "train_tokens_per_second", "peak_memory_mib_per_process"}


def assert_same_run(a: Path, b: Path) -> None:
    """Every metrics.jsonl record equal (numbers within 1e-6, LR exact) and the final weights within 1e-6."""
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [(r["step"], sorted(r)) for r in ra] == [(r["step"], sorted(r)) for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for key in set(x) - MEASURED:
            if isinstance(x[key], float) and key not in ("lr", "lr_after_training", "epoch"):
                assert abs(x[key] - y[key]) <= 1e-6, (key, x, y)  # losses, grad norms, eval metrics
            else:
                assert x[key] == y[key], (key, x, y)  # LRs exactly, counts, steps
    assert max_weight_diff(load_weights(a / "final"), load_weights(b / "final")) <= 1e-6


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


@pytest.fixture(scope="module")
def model_of(tiny_llama, tmp_path_factory):
    """The model a setup trains: the tiny Llama, or for DROPOUT the same with attention dropout 0.1."""
    dropout = []

    def get(name: str) -> Path:
        if name != DROPOUT:
            return tiny_llama
        if not dropout:
            dropout.append(make_tiny_decoder(tmp_path_factory.mktemp("dropout_llama"), attention_dropout=0.1))
        return dropout[0]

    return get


@pytest.fixture(scope="module")
def reference_run(model_of, tmp_path_factory):
    """Run A of a setup, made on first use: uninterrupted, no checkpoints."""
    done = {}

    def get(name: str) -> Path:
        if name not in done:
            config, ga, _ = SETUPS[name]
            out_dir = tmp_path_factory.mktemp(f"{name}_A")
            log = out_dir.parent / f"{out_dir.name}.log"
            finish(start(config, recipe_args(model_of(name), out_dir, ga), log), log)
            done[name] = out_dir
        return done[name]

    return get


@pytest.mark.parametrize("name", LAUNCHED)
def test_sigterm_or_sigint_checkpoints_exits_75_and_resume_equals_the_uninterrupted_run(
    name, reference_run, model_of, tmp_path
):
    config, ga, total = SETUPS[name]
    out = tmp_path / "B"
    args = recipe_args(
        model_of(name), out, ga, "--save_steps", str(SAVE_STEPS), "--save_total_limit", str(SAVE_TOTAL_LIMIT)
    )
    proc = start(config, args, tmp_path / "B1.log")
    wait_for(lambda: trained_steps(out) >= 2, proc, tmp_path / "B1.log")
    pids = workers(proc)
    assert len(pids) == (1 if config == ONE_PROCESS else 2)
    for pid in pids:
        os.kill(pid, STOP_SIGNAL[name])
    output = finish(proc, tmp_path / "B1.log", expect_ok=False)
    assert proc.returncode != 0
    assert re.search(rf"(exit status|exitcode\s*:) {EXIT_INTERRUPTED}", output), output[-4000:]
    stopped = int(re.search(r"stopped by signal after step (\d+)", output).group(1))
    assert 2 <= stopped < total
    assert (out / f"checkpoint-{stopped}" / MARKER).is_file()
    assert trained_steps(out) == stopped  # the step in progress was finished, nothing after it
    assert_loads_without_unpickling_objects(out / f"checkpoint-{stopped}", deepspeed="zero" in name)

    output = finish(
        start(config, [*args, "--resume_from_checkpoint", "latest"], tmp_path / "B2.log"), tmp_path / "B2.log"
    )
    assert f"resumed from {out / f'checkpoint-{stopped}'}: step {stopped}" in output
    assert_same_run(reference_run(name), out)
    # rotation: exactly the newest save_total_limit complete checkpoints remain
    saved = sorted(set(range(SAVE_STEPS, total, SAVE_STEPS)) | {stopped})
    assert [p.name for p in complete_checkpoints(out)] == [
        f"checkpoint-{s}" for s in saved[-SAVE_TOTAL_LIMIT:]
    ]


@pytest.mark.parametrize("name", KILLED)
def test_sigkill_after_a_checkpoint_and_during_the_next_write_resumes_from_the_last_complete_one(
    name, reference_run, tiny_llama, tmp_path
):
    config, ga, total = SETUPS[name]
    out = tmp_path / "C"
    args = recipe_args(tiny_llama, out, ga, "--save_steps", str(SAVE_STEPS))
    proc = start(config, args, tmp_path / "C1.log")
    first = out / f"checkpoint-{SAVE_STEPS}"
    wait_for(lambda: (first / MARKER).is_file(), proc, tmp_path / "C1.log")
    for pid in [*workers(proc), proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert [p.name for p in complete_checkpoints(out)] == [first.name]
    # A write killed half-way leaves a directory under the temporary name, without the completion marker.
    interrupted = out / f"checkpoint-{2 * SAVE_STEPS}.partial"
    shutil.copytree(first, interrupted)
    (interrupted / MARKER).unlink()
    (interrupted / "trainer_state.json").write_text(json.dumps({"step": 2 * SAVE_STEPS}))

    resume = [*args, "--resume_from_checkpoint", "latest", "--save_total_limit", str(SAVE_TOTAL_LIMIT)]
    output = finish(start(config, resume, tmp_path / "C2.log"), tmp_path / "C2.log")
    assert f"skipping incomplete checkpoint {interrupted} (its write did not finish)" in output
    assert f"resumed from {first}: step {SAVE_STEPS}" in output
    assert_same_run(reference_run(name), out)
    assert not interrupted.exists()
    saved = list(range(SAVE_STEPS, total, SAVE_STEPS))
    assert [p.name for p in complete_checkpoints(out)] == [
        f"checkpoint-{s}" for s in saved[-SAVE_TOTAL_LIMIT:]
    ]


# ---------------------------------------------------------------------- output_dir rules, in-process
@pytest.fixture
def run_dir(tmp_path):
    """find_start and Checkpointers for configs writing to one output_dir, on a one-process CPU Accelerator."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from recipes.core.checkpoint import Checkpointer
    from recipes.core.checkpoint_io import AccelerateIO
    from recipes.core.ranks import Ranks
    from recipes.core.run_dir import find_start
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

    return SimpleNamespace(dir=tmp_path / "run", config=config, start=start, checkpointer=checkpointer)


def test_rotation_keeps_exactly_save_total_limit_complete_checkpoints(run_dir):
    from recipes.core.run_dir import Position

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
    from recipes.core.run_dir import Position

    run_dir.checkpointer().save(Position(step=3))
    save_config(run_dir.config(), run_dir.dir / "config.yaml")
    with pytest.raises(
        ConfigError, match=r"holds a run with a different config \(differs in num_train_epochs\)"
    ):
        run_dir.start(num_train_epochs=2.0)
    with pytest.raises(ConfigError, match="already holds checkpoints; pass --resume_from_checkpoint latest"):
        run_dir.start()
    assert run_dir.start(num_train_epochs=2.0, overwrite_output_dir=True).checkpoint is None
    assert complete_checkpoints(run_dir.dir) == []


def test_resume_refuses_an_incomplete_checkpoint_path_and_a_changed_config(run_dir):
    from recipes.core.config import ConfigError
    from recipes.core.run_dir import Position

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


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, total",
    [pytest.param(ONE_PROCESS, 14, id="1proc"), pytest.param(TWO_PROCESSES, 8, id="2proc_ddp")],
)
def test_classify_resumed_after_sigterm_equals_the_uninterrupted_run_and_keeps_the_same_best_model(
    config, total, tmp_path
):
    """50 samples, micro batch 4, GA 2: 13 batches. One process: 7 steps per epoch, 14 in all. Two
    processes: 7 batches per rank (the last one refilled from the start) -> 4 steps per epoch, 8 in all.
    Eval every 3 steps and the model of the lowest eval loss is the one kept, so resume must carry it
    along; on two processes the eval predictions are gathered from both ranks."""
    from test_classify import make_tiny_encoder, run_args, write_uneven_splits

    encoder, data = make_tiny_encoder(tmp_path / "encoder"), write_uneven_splits(tmp_path / "data")

    def args(out: Path, **extra) -> list[str]:
        return run_args(encoder, data, out, metric_for_best_model="loss", report_to="none", **extra)

    a_log, b_log = tmp_path / "A.log", tmp_path / "B1.log"
    finish(start(config, args(tmp_path / "A"), a_log, "recipes/classify.py"), a_log)
    assert trained_steps(tmp_path / "A") == total
    out = tmp_path / "B"
    proc = start(config, args(out, save_steps=SAVE_STEPS), b_log, "recipes/classify.py")
    wait_for(lambda: trained_steps(out) >= 2, proc, b_log)
    pids = workers(proc)
    assert len(pids) == (1 if config == ONE_PROCESS else 2)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    output = finish(proc, b_log, expect_ok=False)
    assert re.search(rf"(exit status|exitcode\s*:) {EXIT_INTERRUPTED}", output), output[-4000:]
    stopped = int(re.search(r"stopped by signal after step (\d+)", output).group(1))
    assert 2 <= stopped < total
    assert trained_steps(out) == stopped

    resumed = args(out, save_steps=SAVE_STEPS, resume_from_checkpoint="latest")
    output = finish(start(config, resumed, tmp_path / "B2.log", "recipes/classify.py"), tmp_path / "B2.log")
    assert f"resumed from {out / f'checkpoint-{stopped}'}: step {stopped}" in output
    assert_same_run(tmp_path / "A", out)
