"""Bad input stops the SFT recipe with one paragraph naming the problem and the fix, without a library
traceback and without leaving a partial checkpoint behind; launched, with exit status 2. With
on_nonfinite: skip, a non-finite step is dropped instead and training continues on plan.

The recipe runs in this process wherever one process shows the behaviour (the error is the exception the
recipe's entry point turns into `error: ...` and status 2, which one launched test checks)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    EXAMPLES,
    REPO,
    SFT_DATA,
    TWO_PROCESSES,
    in_process,
    launch,
    load_plan,
    read_jsonl,
    record_train_sets,
    train_records,
    write_jsonl,
)
from safetensors.torch import load_file, save_file

from recipes.core.errors import EXIT_USER_ERROR, USER_ERRORS
from recipes.core.output.run_dir import complete_checkpoints, incomplete_checkpoints
from recipes.core.plan.steps import Plan


def sft_args(model: Path, output_dir: Path, *extra: str) -> list[str]:
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


def sft(model: Path, output_dir: Path, *extra: str) -> None:
    in_process("sft", sft_args(model, output_dir, *extra))


def user_error(model: Path, output_dir: Path, *extra: str) -> str:
    """The message the recipe stops with (launched: `error: <message>` on stderr, exit status 2)."""
    with pytest.raises(USER_ERRORS) as err:
        sft(model, output_dir, *extra)
    return str(err.value)


def assert_no_partial_checkpoint(output_dir: Path) -> None:
    assert not output_dir.exists() or incomplete_checkpoints(output_dir) == []


def snapshot(directory: Path) -> dict[str, tuple]:
    """Every file and folder under `directory` with its bytes and modification time."""
    return {
        str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
    }


def previous_run(directory: Path) -> dict[str, tuple]:
    """An output_dir holding a finished run (its config, plan, records, model and TensorBoard events);
    returns its snapshot."""
    (directory / "final").mkdir(parents=True)
    (directory / "sft").mkdir()
    (directory / "config.yaml").write_text("seed: 1\n")
    (directory / "plan.json").write_text("{}\n")
    (directory / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (directory / "final" / "model.safetensors").write_bytes(b"weights")
    (directory / "sft" / "events.out.tfevents.1.host").write_bytes(b"events")
    return snapshot(directory)


@pytest.mark.slow
def test_bad_data_launched_on_two_processes_exits_2_with_one_message_and_no_traceback(tiny_llama, tmp_path):
    """Through `recipes launch` (accelerate launch with the recipe's exit status), as a job script runs it:
    status 2, the message once (the other rank stops with rank 0 instead of crashing at a barrier), no
    traceback, and the previous run in output_dir untouched."""
    rows = [json.loads(line) for line in (SFT_DATA / "train.jsonl").read_text().splitlines()[:8]]
    rows[5]["messages"] = "hello"
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    before = previous_run(out)
    args = [*sft_args(tiny_llama, out, "--dataset_name", str(data)), "--overwrite_output_dir", "true"]
    result = launch(TWO_PROCESSES, "sft", args, check=False, exit_status=True)
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {data} (split 'train'), line 6 (row 5), column 'messages': must be a non-empty list of turns, "
        """got str 'hello'; write it as a JSON list such as [{"role": "user", "content": "..."}, """
        """{"role": "assistant", "content": "..."}]"""
    ]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert "recipes launch: exit status 2, bad input" in result.stderr
    assert snapshot(out) == before


def test_model_path_that_does_not_exist(tmp_path):
    missing, out = tmp_path / "no_such_model", tmp_path / "out"
    message = user_error(missing, out)
    assert message == (
        f"model_name_or_path {missing}: no such directory (relative paths start where the run starts); "
        "pass the directory save_pretrained wrote (e.g. the final/ of a run that has finished) or a Hub id"
    )
    assert_no_partial_checkpoint(out)


def test_dataset_too_small_for_one_optimizer_step(tiny_llama, tmp_path):
    # 1 sample, micro batch 2 and drop_last: no full batch, so not one optimizer step
    out = tmp_path / "out"
    message = user_error(tiny_llama, out, "--max_train_samples", "1", "--dataloader_drop_last", "true")
    assert message.startswith(
        f"{SFT_DATA}: 1 training samples give no batch on each of 1 data-parallel ranks at "
        "per_device_train_batch_size 2 with drop_last; provide at least 2 samples"
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
    message = user_error(tiny_llama, out, *args)
    assert message.startswith("training diverged at optimizer step 2: loss nan")
    assert f"the last good checkpoint is {out / 'checkpoint-1'}" in message
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1"]
    assert_no_partial_checkpoint(out)
    assert not (out / "final").exists()


def test_output_dir_that_cannot_be_written(tiny_llama, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "run"  # a directory cannot be made under a regular file
    assert user_error(tiny_llama, out).startswith(f"output_dir {out} is not writable (Not a directory)")
    assert blocker.read_text() == ""


def test_failed_checkpoint_write_keeps_the_previous_checkpoint_which_resume_uses(
    tiny_llama, tmp_path, capsys
):
    # A regular file where step 2's checkpoint is to be written makes that write fail like a full disk.
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-2.partial").write_text("")
    args = ["--save_steps", "1", "--max_steps", "3"]
    message = user_error(tiny_llama, out, *args)
    assert message.startswith(f"writing checkpoint {out / 'checkpoint-2'} failed at step 2 (")
    assert f"the previous checkpoint {out / 'checkpoint-1'} is intact" in message
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1"]

    (out / "checkpoint-2.partial").unlink()
    capsys.readouterr()
    sft(tiny_llama, out, *args, "--resume_from_checkpoint", "latest")
    assert f"resumed from {out / 'checkpoint-1'}: step 1" in capsys.readouterr().out
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert (out / "final" / "model.safetensors").is_file()


# ---------------------------------------------------------------------- on_nonfinite: skip
POISON = "\x07"  # a byte no bundled sample contains; the test tokenizer has a token of its own for it


def poisoned_model(model: Path, directory: Path) -> tuple[Path, int]:
    """The tiny model with an infinite input embedding for POISON's token (returned with the model): a
    sample holding it has a NaN loss (RMSNorm of inf is inf * 0) and NaN gradients; the others train."""
    from transformers import AutoTokenizer

    shutil.copytree(model, directory)
    token = AutoTokenizer.from_pretrained(directory).encode(POISON, add_special_tokens=False)
    assert len(token) == 1
    weights = load_file(directory / "model.safetensors")
    weights["model.embed_tokens.weight"][token[0]] = float("inf")
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return directory, token[0]


def poisoned_data(path: Path, num_samples: int, poisoned_index: int) -> Path:
    """The first `num_samples` bundled samples; the one at `poisoned_index` starts with POISON."""
    rows = [json.loads(line) for line in (SFT_DATA / "train.jsonl").read_text().splitlines()[:num_samples]]
    user = next(turn for turn in rows[poisoned_index]["messages"] if turn["role"] == "user")
    user["content"] = POISON + user["content"]
    assert sum(POISON in turn["content"] for row in rows for turn in row["messages"]) == 1
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def poisoned_at_step_3(
    tiny_llama: Path, tmp_path: Path, num_samples: int, ranks: int
) -> tuple[Path, int, list[str]]:
    """Model, poisoned token and recipe arguments of a 4-step run (micro batch 2, GA 1, num_samples =
    8 x ranks) whose step 3 alone trains on the poisoned sample. Accelerate's seedable sampler orders
    epoch 0 as randperm(num_samples) of a generator seeded with the seed (42) and deals that order's
    batches to the ranks in turn, so step 3 starts at order[4 * ranks], on rank 0."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(42)).tolist()
    model, token = poisoned_model(tiny_llama, tmp_path / "model")
    data = poisoned_data(tmp_path / "train.jsonl", num_samples, poisoned_index=order[4 * ranks])
    args = ["--dataset_name", str(data), "--max_train_samples", str(num_samples), "--max_seq_length", "128"]
    args += ["--num_train_epochs", "1", "--learning_rate", "1e-3", "--warmup_steps", "2", "--save_steps", "1"]
    return model, token, args


@pytest.mark.parametrize(
    "ranks, num_samples",
    [pytest.param(1, 8, id="1proc"), pytest.param(2, 16, id="2proc_ddp", marks=pytest.mark.slow)],
)
def test_skip_drops_exactly_the_non_finite_step_and_training_continues_on_plan(
    ranks, num_samples, tiny_llama, tmp_path, capsys
):
    # On two processes only rank 0's sample is poisoned: rank 1's loss of step 3 is finite.
    model, token, args = poisoned_at_step_3(tiny_llama, tmp_path, num_samples, ranks)
    out = tmp_path / "out"
    args = sft_args(model, out, *args, "--on_nonfinite", "skip")
    if ranks == 1:
        capsys.readouterr()
        in_process("sft", args)
        output = capsys.readouterr().out
    else:
        output = launch(TWO_PROCESSES, "sft", args).stdout
    assert f"train samples: {num_samples} (" in output and "0 dropped" in output  # as ordered
    assert "step 3: loss nan, grad_norm nan: update skipped (1 skipped so far, 1 in a row; " in output

    records = train_records(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r.get("skipped", False) for r in records] == [False, False, True, False]
    assert (records[2]["loss"], records[2]["grad_norm"], records[2]["skipped_steps"]) == ("nan", "nan", 1)
    assert all(isinstance(r["loss"], float) for r in records if r["step"] != 3)
    # The schedule advanced through the skipped step: every LR is the planned one, exactly.
    plan = Plan(**{key: value for key, value in load_plan(out).items() if key != "data"})
    assert plan.total_optimizer_steps == 4
    assert [r["lr"] for r in records] == [plan.lr_at(s) for s in (1, 2, 3, 4)]

    # Weights and optimizer state after step 3 are exactly those after step 2; step 4 trained again.
    from accelerate.utils.other import load

    before, after = (load_file(out / f"checkpoint-{s}" / "model.safetensors") for s in (2, 3))
    final = load_file(out / "final" / "model.safetensors")  # after step 4, the last
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(after[k], final[k]) for k in after)
    opt_before, opt_after = (load(out / f"checkpoint-{s}" / "optimizer.bin") for s in (2, 3))
    assert opt_before["state"].keys() == opt_after["state"].keys() and opt_before["state"]
    for key, state in opt_before["state"].items():
        assert all(torch.equal(value, opt_after["state"][key][name]) for name, value in state.items())
    # Nothing non-finite reached the weights: only the poisoned embedding row is (still) infinite.
    embedding = final.pop("model.embed_tokens.weight")
    assert all(torch.isfinite(weights).all() for weights in final.values())
    assert torch.isinf(embedding[token]).all()
    assert torch.isfinite(torch.cat([embedding[:token], embedding[token + 1 :]])).all()


def test_a_run_stopped_at_a_non_finite_step_resumes_past_it_with_skip(tiny_llama, tmp_path, capsys):
    model, _, args = poisoned_at_step_3(tiny_llama, tmp_path, num_samples=8, ranks=1)
    out = tmp_path / "out"
    message = user_error(model, out, *args)
    assert message.startswith("training diverged at optimizer step 3: loss nan, grad_norm nan;")
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]

    capsys.readouterr()
    sft(model, out, *args, "--on_nonfinite", "skip", "--resume_from_checkpoint", "latest")
    assert f"resumed from {out / 'checkpoint-2'}: step 2" in capsys.readouterr().out
    records = train_records(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r.get("skipped", False) for r in records] == [False, False, True, False]


def test_skip_stops_after_max_consecutive_skips_steps_in_a_row(tiny_llama, tmp_path):
    # As in the stop test: step 1 at LR 1e30 breaks the model, so every later step is non-finite.
    out = tmp_path / "out"
    args = ["--learning_rate", "1e30", "--warmup_steps", "0", "--warmup_ratio", "0", "--save_steps", "1"]
    args += ["--max_steps", "6", "--on_nonfinite", "skip", "--max_consecutive_skips", "2"]
    message = user_error(tiny_llama, out, *args)
    assert message.startswith(
        "training diverged: optimizer steps 2 to 3 were all skipped (loss nan, grad_norm nan at step 3; "
        f"max_consecutive_skips is 2); the last checkpoint is {out / 'checkpoint-2'}."
    )
    records = train_records(out)
    assert [(r["step"], r.get("skipped", False)) for r in records] == [(1, False), (2, True)]
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    one, two = (load_file(out / f"checkpoint-{s}" / "model.safetensors") for s in (1, 2))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not (out / "final").exists()


def test_on_nonfinite_value_that_does_not_exist(tiny_llama, tmp_path):
    message = user_error(tiny_llama, tmp_path / "out", "--on_nonfinite", "skp")
    assert message.startswith("1 config problem(s) found before training:")
    assert "on_nonfinite: 'skp' is not one of stop, skip\n    fix: use stop (the run stops" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # DeepSpeed's process group loads (and on a fresh machine builds) its C++ op
def test_skip_is_refused_under_deepspeed_before_training(deepspeed_env, tiny_llama, tmp_path):
    # Accelerate's DeepSpeed backward applies the update itself, so the recipe could not drop it.
    deepspeed_env(REPO / "ds_configs" / "zero1.json")
    message = user_error(tiny_llama, tmp_path / "out", "--on_nonfinite", "skip")
    assert "on_nonfinite: skip cannot be honoured under DeepSpeed: its backward applies" in message
    assert "fix: use on_nonfinite: stop (the run stops at that step and keeps the last good" in message
    assert not (tmp_path / "out").exists()


def test_skip_is_refused_with_fp16_and_with_a_limit_below_one_before_training():
    from recipes.core.doctor.diagnose import preflight
    from recipes.core.doctor.findings import DoctorError
    from recipes.sft import SFTConfig

    cfg = SFTConfig(learning_rate=1e-3, on_nonfinite="skip", mixed_precision="fp16", max_consecutive_skips=0)
    with pytest.raises(DoctorError) as raised:
        preflight(cfg, 1, env={})
    message = str(raised.value)
    assert message.startswith("2 config problem(s) found before training:\n")
    assert "on_nonfinite: skip does not combine with fp16: its loss scaler skips overflowing steps" in message
    assert "fix: use mixed_precision: bf16 or no, or on_nonfinite: stop" in message
    assert "max_consecutive_skips: 0 would stop the run before any step is skipped" in message
    preflight(SFTConfig(learning_rate=1e-3, on_nonfinite="skip", mixed_precision="bf16"), 1, env={})


def test_recipes_doctor_reports_skip_with_a_deepspeed_launch_config(tmp_path, monkeypatch):
    from recipes.core.doctor.diagnose import diagnose

    monkeypatch.chdir(REPO)  # the accelerate configs name their DeepSpeed JSON relative to the repo root
    recipe = tmp_path / "sft_skip.yaml"
    recipe.write_text("learning_rate: 0.001\non_nonfinite: skip\n")
    findings = diagnose("accelerate_configs/ds_zero3.yaml", recipe_config=str(recipe))
    assert [(f.file, f.key, f.line) for f in findings] == [(str(recipe), "on_nonfinite", 2)]
    assert diagnose("accelerate_configs/multi_gpu.yaml", recipe_config=str(recipe)) == []


# ---------------------------------------------------------------------- bad data
CHAT_ROWS = [json.loads(line) for line in (SFT_DATA / "train.jsonl").read_text().splitlines()[:6]]


def bad_data_error(tiny_llama: Path, tmp_path: Path, dataset: Path, *extra: str) -> str:
    """The message a run on `dataset` stops with, after checking that the previous run in its output_dir
    (which it was told to overwrite) is left exactly as it was and that no DataLoader was made."""
    out = tmp_path / "out"
    before = previous_run(out)
    args = ["--dataset_name", str(dataset), "--overwrite_output_dir", "true", *extra]
    message = user_error(tiny_llama, out, *args)
    assert snapshot(out) == before
    return message


def lines_file(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_malformed_json_line_is_named_by_file_and_line(tiny_llama, tmp_path):
    lines = [json.dumps(row) for row in CHAT_ROWS[:3]] + [
        '{"messages": [{"role": "user",',
        json.dumps(CHAT_ROWS[3]),
    ]
    data = lines_file(tmp_path / "train.jsonl", lines)
    try:
        json.loads(lines[3])
    except json.JSONDecodeError as err:
        reason = f"{err.msg} at column {err.colno}"
    assert bad_data_error(tiny_llama, tmp_path, data) == (
        f"{data}, line 4: not valid JSON ({reason}); fix that line (JSON Lines: one JSON object per line) and "
        "run again"
    )


def test_a_json_line_is_named_once_by_the_recipe_not_contradicted_by_the_reader(tiny_llama, tmp_path, capfd):
    """The datasets reader logs its own "JSON parse error ... in row 4" (counted from 0) for this file."""
    lines = [json.dumps(row) for row in read_jsonl(EXAMPLES / "prompt_completion.jsonl")]
    lines[4] = '{"prompt": "Question: what is 2 + 2?", "completion": " 4'
    data = lines_file(tmp_path / "train.jsonl", lines)
    capfd.readouterr()
    assert bad_data_error(tiny_llama, tmp_path, data) == (
        f"{data}, line 5: not valid JSON (Unterminated string starting at column 54); fix that line (JSON "
        "Lines: one JSON object per line) and run again"
    )
    printed = capfd.readouterr()
    assert "JSON parse error" not in printed.out + printed.err
    assert "row 4" not in printed.out + printed.err


@pytest.mark.parametrize("content", [b"", b"  \n\n \t\n"], ids=["empty", "whitespace"])
def test_an_empty_file_is_named(tiny_llama, tmp_path, content):
    data = tmp_path / "train.jsonl"
    data.write_bytes(content)
    assert bad_data_error(tiny_llama, tmp_path, data) == (
        f"{data} is empty (no rows); write the data into it, or point dataset_name at another file"
    )


def test_bytes_that_are_not_utf8_are_named_by_line_and_column(tiny_llama, tmp_path):
    good = "".join(json.dumps(row) + "\n" for row in CHAT_ROWS[:2]).encode()
    bad = b'{"messages": [{"role": "user", "content": "caf' + b"\xe9" + b'"}]}\n'
    data = tmp_path / "train.jsonl"
    data.write_bytes(good + bad)
    column = bad.index(b"\xe9") + 1
    assert bad_data_error(tiny_llama, tmp_path, data) == (
        f"{data}, line 3: not UTF-8 (byte 0xe9 at column {column}); save the file as UTF-8, e.g. iconv -f "
        "<its encoding> -t UTF-8"
    )


def test_a_missing_file_and_an_unreachable_hub_id_are_named(tiny_llama, tmp_path):
    missing = tmp_path / "no_such.jsonl"
    assert bad_data_error(tiny_llama, tmp_path, missing).startswith(
        f"dataset_name {missing}: no such file or directory; pass the path of a data file"
    )
    message = bad_data_error(tiny_llama, tmp_path / "hub", Path("someone/no-such-dataset"))
    assert message.startswith(
        "dataset_name someone/no-such-dataset is not a local file or directory and cannot be loaded from the Hub ("
    )
    assert message.endswith(
        "pass the path of a data file or directory, or a Hub id (offline, only datasets already in the "
        "cache), with dataset_config_name when it has several configurations"
    )


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"messages": "hello"}, "column 'messages': must be a non-empty list of turns, got str 'hello'"),
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]},
            """column 'messages': turn 1 has no content (a missing key or a null); give every turn its text as """
            """a string (an empty reply is "", not null)""",
        ),
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]},
            "column 'messages': turn 1 has no content (a missing key or a null)",
        ),
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Hello"}]},
            "column 'messages': turn 1 has the unknown role 'robot'; use one of user, human, assistant, gpt, "
            "bot, model, chatgpt, system, tool, function, observation (mapped to user, assistant, system and "
            "tool)",
        ),
    ],
    ids=["messages_as_a_string", "content_null", "content_missing", "unknown_role"],
)
def test_a_row_of_the_wrong_shape_is_named_by_file_line_and_column(tiny_llama, tmp_path, row, problem):
    rows = [*CHAT_ROWS[:4], row, CHAT_ROWS[4]]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    assert bad_data_error(tiny_llama, tmp_path, data).startswith(
        f"{data} (split 'train'), line 5 (row 4), {problem}"
    )


def test_a_bad_validation_row_names_the_validation_file(tiny_llama, tmp_path):
    directory = tmp_path / "data"
    directory.mkdir()
    write_jsonl(directory / "train.jsonl", CHAT_ROWS)
    write_jsonl(directory / "validation.jsonl", [CHAT_ROWS[0], {"messages": [{"role": "user"}]}])
    message = bad_data_error(tiny_llama, tmp_path, directory, "--eval_split", "validation")
    assert message.startswith(
        f"{directory / 'validation.jsonl'} (split 'validation'), line 2 (row 1), column 'messages': turn 0 has "
        "no content (a missing key or a null)"
    )


def test_conversations_without_an_assistant_turn_are_an_error_when_no_row_has_one(tiny_llama, tmp_path):
    rows = [
        {"messages": [turn for turn in row["messages"] if turn["role"] != "assistant"]} for row in CHAT_ROWS
    ]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    assert bad_data_error(tiny_llama, tmp_path, data) == (
        f"none of the 6 rows of split 'train' of {data} has anything to train on (no assistant turn to train "
        "on in every row); check the roles and the messages columns ['messages']"
    )


def test_a_directory_without_the_configured_split_lists_the_splits_it_has(tiny_llama, tmp_path):
    directory = tmp_path / "data"
    directory.mkdir()
    write_jsonl(directory / "train.jsonl", CHAT_ROWS)
    write_jsonl(directory / "test.jsonl", CHAT_ROWS)
    assert bad_data_error(tiny_llama, tmp_path, directory, "--eval_split", "validation") == (
        f"dataset {directory} has no split 'validation'; it has ['test', 'train']. Set eval_split to one of "
        "them (eval_split: null turns evaluation off; eval_split_size holds out training rows instead)"
    )


def test_columns_that_fit_several_formats_are_an_error_listing_them(tiny_llama, tmp_path):
    rows = [{**row, "text": "a summary"} for row in CHAT_ROWS]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    assert bad_data_error(tiny_llama, tmp_path, data) == (
        f"split 'train' of {data} has columns ['messages', 'text'], which fit the formats messages, text; set "
        "dataset_format to the one it is (e.g. dataset_format: messages)"
    )


def test_every_sample_losing_its_targets_to_truncation_stops_before_any_dataloader(
    tiny_llama, tmp_path, monkeypatch
):
    made = record_train_sets(monkeypatch)
    data = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS)
    assert bad_data_error(tiny_llama, tmp_path, data, "--max_seq_length", "8") == (
        f"no sample of split 'train' of {data} has a token left to train on: all 6 lost their targets to "
        "truncation at max_seq_length 8; raise max_seq_length or shorten the prompts"
    )
    message = bad_data_error(
        tiny_llama, tmp_path / "small", data, "--max_train_samples", "1", "--dataloader_drop_last", "true"
    )
    assert message.startswith(f"{data}: 1 training samples give no batch on each of 1 data-parallel ranks")
    assert made == []


def test_overwriting_replaces_the_previous_run_as_a_whole_once_the_inputs_are_checked(tiny_llama, tmp_path):
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    sft(tiny_llama, out, "--max_steps", "3", "--report_to", "tensorboard", "--save_steps", "1")
    old = {p for p in out.rglob("*") if p.is_file()}
    args = ["--max_steps", "2", "--report_to", "tensorboard"]
    sft(tiny_llama, out, *args, "--overwrite_output_dir", "true")
    sft(tiny_llama, fresh, *args)
    assert not old & {p for p in out.rglob("*") if p.is_file() and "tfevents" in p.name}

    # Exactly the files of a run made in an empty folder: no old events, records or model files left
    # (TensorBoard names its files and folders by the time they were made).
    def files(directory: Path) -> list[str]:
        paths = (p.relative_to(directory) for p in directory.rglob("*") if p.is_file())
        return sorted(re.sub(r"tfevents\.[\w.]+|\d+\.\d+/", "<time>", str(p)) for p in paths)

    assert files(out) == files(fresh)
    assert [r["step"] for r in train_records(out)] == [1, 2]


def test_overwriting_refuses_a_folder_that_also_holds_files_no_run_writes(tiny_llama, tmp_path):
    out = tmp_path / "out"
    previous_run(out)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    message = user_error(tiny_llama, out, "--overwrite_output_dir", "true")
    assert message == (
        f"output_dir {out} holds a previous run, which this run replaces as a whole, and also files no run "
        "writes (notes.txt); move them out of it, or pick another --output_dir"
    )
    assert snapshot(out) == before


# ---------------------------------------------------------------------- bad classification data
def classify_error(
    encoder: Path, news_data: Path, tmp_path: Path, edit, *extra: str, splits=("train",)
) -> str:
    """The message a classification run stops with on a copy of the news data that `edit(rows)` spoiled
    in `splits`."""
    from helpers import classify_args, read_jsonl

    data = tmp_path / "news"
    shutil.copytree(news_data, data)
    for split in splits:
        rows = read_jsonl(data / f"{split}.jsonl")
        edit(rows)
        write_jsonl(data / f"{split}.jsonl", rows)
    args = [*classify_args(encoder, data, tmp_path / "out", report_to="none"), *extra]
    with pytest.raises(USER_ERRORS) as err:
        in_process("classify", args)
    assert not (tmp_path / "out").exists()
    return str(err.value).replace(str(data), "<data>")


def test_classification_rows_with_no_text_or_label_or_a_label_of_the_wrong_kind_are_named(
    encoder, news_data, tmp_path
):
    def null_text(rows):
        rows[3]["text"] = None

    def missing_label(rows):
        del rows[7]["label"]

    def float_label(rows):
        for i, row in enumerate(rows):
            row["label"] = float(i % 4)

    def list_label(rows):
        rows[2]["label"] = ["sports", "travel"]

    assert classify_error(encoder, news_data, tmp_path / "a", null_text) == (
        "<data>/train.jsonl (split 'train'), line 4 (row 3), column 'text': the row has no text (a missing key, "
        "a null or an empty cell); give every row its text as a string"
    )
    assert classify_error(encoder, news_data, tmp_path / "b", missing_label) == (
        "<data>/train.jsonl (split 'train'), line 8 (row 7), column 'label': the row has no label (a missing "
        "key, a null or an empty cell); give every row a label, or remove the rows without one"
    )
    names = ["--label_names", "[business,science,sports,travel]"]
    every_split = {"splits": ("train", "validation", "test")}  # a column of floats in every file
    assert classify_error(encoder, news_data, tmp_path / "c", float_label, *names, **every_split) == (
        "<data>/train.jsonl (split 'train'), line 1 (row 0), column 'label': the label is the float 0.0; labels "
        "are class names or integer class ids; write ids as integers (1, not 1.0); a CSV column with an empty "
        "cell is read as floats"
    )
    assert classify_error(encoder, news_data, tmp_path / "d", list_label).startswith(
        "<data>/train.jsonl (split 'train'), line 3 (row 2), column 'label': the label is list"
    )


def test_integer_labels_are_class_ids_and_one_that_skips_ids_is_named_with_or_without_label_names(
    encoder, news_data, tmp_path
):
    def skipping(rows):  # ids 0-3, and 7 in line 6
        for i, row in enumerate(rows):
            row["label"] = i % 4
        rows[5]["label"] = 7

    every_split = {"splits": ("train", "validation", "test")}  # one type of label in every file
    assert classify_error(encoder, news_data, tmp_path / "a", skipping, **every_split) == (
        "<data>/train.jsonl (split 'train'), line 6 (row 5), column 'label': the label 7 skips the class ids 4, "
        "5, 6, which no row has; integer labels are class ids 0 to N-1; renumber the labels 0 to N-1, or name "
        "every class in label_names, in id order"
    )
    names = ["--label_names", "0,1,2,3"]
    assert classify_error(encoder, news_data, tmp_path / "b", skipping, *names, **every_split) == (
        "<data>/train.jsonl (split 'train'), line 6 (row 5), column 'label': the label 7 is not one of the "
        "classes ['0', '1', '2', '3']; add it to label_names, or correct the label"
    )

    def negative(rows):
        for i, row in enumerate(rows):
            row["label"] = i % 4 if i != 2 else -1

    assert classify_error(encoder, news_data, tmp_path / "c", negative, **every_split) == (
        "<data>/train.jsonl (split 'train'), line 3 (row 2), column 'label': the label -1 is a negative "
        "integer; integer labels are class ids 0 to N-1; renumber the labels 0 to N-1, or remove the rows "
        "without a class (-1 often marks them)"
    )


def test_a_single_class_is_named_with_its_file_and_split(encoder, news_data, tmp_path):
    def one_class(rows):
        for row in rows:
            row["label"] = "sports"

    assert classify_error(encoder, news_data, tmp_path, one_class) == (
        "classification needs at least 2 classes, found ['sports'] in column 'label' of split 'train' of "
        "<data>; check that label_column names the labels and that the split holds examples of every class"
    )


def test_a_missing_test_split_suggests_test_split(encoder, news_data, tmp_path):
    message = classify_error(encoder, news_data, tmp_path, lambda rows: None, "--test_split", "holdout")
    assert message == (
        "dataset <data> has no split 'holdout'; it has ['test', 'train', 'validation']. Set test_split to one "
        "of them (test_split: null skips the test)"
    )


# ---------------------------------------------------------------------- exit statuses
@pytest.mark.parametrize(
    "launcher, recorded, expected",
    [
        (0, [0, 0], 0),
        (1, [2], 2),  # rank 0 stopped on bad input; torchrun then stopped rank 1 before it recorded
        (1, [2, 1], 2),  # a rank that crashed because rank 0 was gone
        (1, [75, 75], 75),
        (1, [75, 1], 1),  # a crash next to a stop is a crash
        (1, [1], 1),
        (137, [], 137),  # killed without a word: the launcher's status
    ],
)
def test_recipes_launch_exits_with_the_status_the_processes_recorded(launcher, recorded, expected):
    from recipes.core.exit_status import resolve

    assert resolve(launcher, [{"rank": i, "status": s} for i, s in enumerate(recorded)]) == expected


def test_a_recipe_records_how_its_process_ended_where_recipes_launch_asks(tmp_path, monkeypatch, capsys):
    from recipes.core.errors import DataError, run_recipe
    from recipes.core.exit_status import STATUS_DIR_ENV, read

    def bad_data() -> None:
        raise DataError("train.jsonl is empty")

    def stopped() -> None:
        raise SystemExit(75)

    monkeypatch.setenv(STATUS_DIR_ENV, str(tmp_path))
    for rank, main, status in (("0", bad_data, 2), ("1", stopped, 75), ("2", lambda: None, 0)):
        monkeypatch.setenv("RANK", rank)
        if status:
            with pytest.raises(SystemExit) as exit_info:
                run_recipe(main)
            assert exit_info.value.code == status
        else:
            run_recipe(main)
    assert read(tmp_path) == [
        {"rank": 0, "status": 2, "message": "train.jsonl is empty"},
        {"rank": 1, "status": 75, "message": ""},
        {"rank": 2, "status": 0, "message": ""},
    ]
    assert capsys.readouterr().err == "error: train.jsonl is empty\n"
