"""The README's commands work: the quick start runs the default job, the rest name files that exist."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest
import torch
from helpers import REPO, read_jsonl

README = (REPO / "README.md").read_text()


def readme_commands() -> list[str]:
    """Command lines of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


COMMANDS = readme_commands()
QUICKSTART = "bash scripts/quickstart.sh"
TEST_COMMAND = ".venv/bin/python -m pytest"


def test_readme_gives_the_two_commands_and_ci_runs_the_test_command():
    assert COMMANDS[:2] == [QUICKSTART, TEST_COMMAND]
    ci_lines = [
        line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")
    ]
    assert ci_lines[-1] == TEST_COMMAND


@pytest.mark.parametrize(
    "command", [c for c in COMMANDS if "accelerate launch" in c or c.startswith("deepspeed ")]
)
def test_launch_commands_name_files_that_exist(command):
    words = shlex.split(command)
    paths = [w for w in words if re.match(r"^(recipes|accelerate_configs|ds_configs)/", w)]
    flagged = [
        words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--config_file", "--config", "--hostfile")
    ]
    assert paths, command
    for path in {*paths, *flagged}:
        if "<" in path or "X" in path:
            continue  # placeholders such as <topology>.yaml
        assert (REPO / path).exists(), f"{command!r} names {path}, which does not exist"


@pytest.mark.parametrize(
    "command", [c for c in COMMANDS if c.startswith("recipes plan") or c.startswith("recipes doctor")]
)
@pytest.mark.slow
def test_recipes_commands_in_the_readme_run(command, capsys, monkeypatch):
    """Through the `recipes` entry point's own function, in this process: the console script is
    `recipes.cli:main`, so this is what the typed command runs, without a process start per command."""
    from recipes.cli import main

    monkeypatch.chdir(REPO)  # the README's paths are relative to the repository
    status = main(shlex.split(command)[1:])
    out = capsys.readouterr().out
    assert status == 0, out[-3000:]
    if "--json" in command:
        assert json.loads(out)["total_optimizer_steps"] > 0
    elif command.startswith("recipes plan"):
        assert re.search(r"^total_optimizer_steps +[1-9]", out, flags=re.M), out[-3000:]
    else:
        assert "doctor: no problems found" in out, out[-3000:]


@pytest.mark.slow
def test_quickstart_runs_the_default_job_on_the_real_default_model(tmp_path):
    """The same entry point a user runs, shortened to 2 optimizer steps of 2 samples (the default's 16
    take 8 s a step on 2 cores) and evaluations of 4."""
    out = tmp_path / "quickstart"
    shorter = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1"]
    result = subprocess.run(
        ["bash", "scripts/quickstart.sh", *shorter, "--max_eval_samples", "4", "--output_dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stdout = result.stdout + result.stderr
    assert "plan: 256 samples, world size 1" in stdout
    assert f"fine-tuned model saved to {out}/final" in stdout
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(out / "final")
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == (
        "llama",
        30,
        576,
    )  # SmolLM2-135M
    model = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
