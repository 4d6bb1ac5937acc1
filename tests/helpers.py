"""What the tests share: tiny models and data built locally (nothing downloaded), the one way to run a recipe
(the real `accelerate launch`, or its `main` in this process for one-process runs), the shared tiny job,
and readers and comparisons of what a run leaves behind."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    BertTokenizer,
    PreTrainedTokenizerFast,
)

from recipes.core.launch.command import free_port, launch_command
from recipes.data.generators.news_topics import NEWS_DIR

REPO = Path(__file__).resolve().parent.parent
SFT_DATA = REPO / "recipes" / "data" / "sft_instructions"
SFT_CONFIG = "recipes/configs/sft_smollm2.yaml"
PIPELINE_CONFIG = "recipes/configs/sft_pipeline_smollm2.yaml"
CLASSIFY_CONFIG = "recipes/configs/classify_minilm.yaml"
ONE_PROCESS, TWO_PROCESSES = "accelerate_configs/cpu.yaml", "accelerate_configs/cpu_2proc.yaml"
PIPELINE = "accelerate_configs/pipeline_2proc.yaml"
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# ---------------------------------------------------------------- the shared tiny job
# 44 samples at micro batch 2, 8 samples per optimizer step on every topology (GA 4 on one process or one
# pipeline, GA 2 on two data-parallel ranks, GA 1 at micro batch 8): windows of 8, 8, 8, 8, 8 and a short
# 4-sample one, so 6 steps per epoch and 12 over 2 epochs, the same samples in the same step everywhere.
# Checkpoints every 4 steps land mid-epoch (step 4: epoch 0; step 8: epoch 1); evaluations at 0, 4, 8, 12.
# max_grad_norm 0.5 is below every step's gradient norm, so clipping always acts.
JOB_STEPS, JOB_STEPS_PER_EPOCH, JOB_WARMUP, JOB_SAVE_STEPS = 12, 6, 3, 4
JOB = [
    "--dataset_name", str(SFT_DATA), "--max_train_samples", "44", "--per_device_train_batch_size", "2",
    "--global_batch_size", "8", "--num_train_epochs", "2", "--warmup_steps", str(JOB_WARMUP),
    "--max_seq_length", "96", "--learning_rate", "1e-3", "--max_grad_norm", "0.5", "--seed", "7",
    "--max_eval_samples", "13", "--per_device_eval_batch_size", "4", "--eval_steps", "4", "--logging_steps", "1",
    "--save_steps", str(JOB_SAVE_STEPS), "--report_to", "none",
]  # fmt: skip


def job_args(model: Path, output_dir: Path, *extra: str, config: str = SFT_CONFIG) -> list[str]:
    """The shared job's recipe arguments; `extra` overrides any of them."""
    return [
        "--config",
        config,
        "--model_name_or_path",
        str(model),
        "--output_dir",
        str(output_dir),
        *JOB,
        *extra,
    ]


# ---------------------------------------------------------------- running recipes
def launch(
    accelerate_config: str | None,
    script: str,
    args: list[str],
    *,
    num_processes: int | None = None,
    env: dict | None = None,
    check: bool = True,
    timeout: int = 900,
    log: Path | None = None,
    port: int | None = None,
    launch_args: list[str] = (),
    exit_status: bool = False,
) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run a recipe through the real `accelerate launch` (plain python without a config) on `port`, by
    default a free one; `launch_args` go to `accelerate launch` (e.g. a machine rank). With `exit_status`,
    through `recipes launch`, which is accelerate launch exiting with the recipe's own status.

    With `log`, start it in a session of its own with its output going to `log` and return the running
    launcher, for a test that signals its processes; otherwise wait and return the finished process
    (with `check`, a failure raises with the output)."""
    script = script if script.endswith(".py") else f"recipes/{script}.py"
    config = None if accelerate_config is None else str(REPO / accelerate_config)
    cmd = launch_command(str(REPO / script), args, config, num_processes, port=port or free_port())
    cmd[cmd.index(str(REPO / script)) : cmd.index(str(REPO / script))] = launch_args
    if exit_status:
        assert cmd[1:3] == ["-m", "accelerate.commands.launch"], cmd
        cmd[1:3] = ["-m", "recipes.cli", "launch"]
    full_env = {**os.environ, **OFFLINE, **(env or {})}
    if log is not None:
        output = open(log, "w")  # noqa: SIM115 - the child writes to it until the test waits for it
        return subprocess.Popen(
            cmd, cwd=REPO, env=full_env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    result = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


def in_process(script: str, args: list[str]) -> None:
    """Run a recipe's `main` in this process, as a one-process `python recipes/<script>.py` run does:
    the same Accelerator, loop and files, without a process start. Accelerate's process-wide state is
    reset afterwards, so the next run starts from scratch as a new process would."""
    from accelerate.state import AcceleratorState, GradientState

    module = importlib.import_module(f"recipes.{script}")
    try:
        module.main(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def finish(proc: subprocess.Popen, log: Path, expect_ok: bool = True) -> str:
    """Wait for a launcher started with `launch(..., log=...)`; its output."""
    proc.wait(timeout=600)
    output = log.read_text()
    if expect_ok:
        assert proc.returncode == 0, output[-6000:]
    return output


def workers(launcher: subprocess.Popen, script: str) -> list[int]:
    """The recipe processes under a launcher (which runs them in sessions of their own): signal these."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [launcher.pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    pids = []
    for pid in found:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(f"recipes/{script}.py".encode()) for part in cmdline[:3]):
            pids.append(pid)
    return pids


def wait_for(condition, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        assert proc.poll() is None, f"run ended before the interruption point:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.01)


def resume_copy(run: Path, step: int, destination: Path) -> Path:
    """`run`'s output_dir as it stood right after checkpoint-`step` was written, copied to `destination`:
    later checkpoints and the final model removed (resume drops the later records itself)."""
    shutil.copytree(run, destination)
    for path in destination.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if path.name in ("final", "merged") or (match and int(match.group(1)) > step):
            shutil.rmtree(path)
    return destination


# ---------------------------------------------------------------- what a run leaves behind
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train_records(output_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(Path(output_dir) / "metrics.jsonl") if "loss" in r]


def eval_records(output_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(Path(output_dir) / "metrics.jsonl") if "eval_loss" in r]


def trained_steps(output_dir: Path) -> int:
    path = Path(output_dir) / "metrics.jsonl"
    records = read_jsonl(path) if path.is_file() else []
    return max([r["step"] for r in records if "loss" in r], default=0)


def load_plan(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / "plan.json").read_text())


PNG = b"\x89PNG\r\n\x1a\n"


def assert_curves_and_tensorboard_losses(output_dir: Path, run_name: str, steps: int) -> None:
    """The run drew curves.png, and its one TensorBoard event file (under output_dir/<run name>/) holds the
    loss metrics.jsonl records for each of its `steps` steps, at that step, as the float32 TensorBoard keeps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert (Path(output_dir) / "curves.png").read_bytes()[:8] == PNG
    records = train_records(output_dir)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    [events] = (Path(output_dir) / run_name).glob("events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload().Scalars("loss")
    assert [(e.step, e.value) for e in scalars] == [(r["step"], np.float32(r["loss"])) for r in records]


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, from one safetensors file or the shards its index names."""
    from safetensors.torch import load_file

    index = Path(model_dir) / "model.safetensors.index.json"
    if not index.is_file():
        return load_file(str(Path(model_dir) / "model.safetensors"))
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return {k: v for shard in shards for k, v in load_file(str(Path(model_dir) / shard)).items()}


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), a.keys() ^ b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# Timings and memory of a run, which no two runs share.
MEASURED = {
    "step_time",
    "train_runtime",
    "train_tokens_per_second",
    "train_samples_per_second",
    "train_pairs_per_second",
    "peak_memory_mib_per_process",
    "setup_peak_memory_mib_per_process",
    "memory_census",  # resident sets, and a resumed run counts the step after its resume
}


def assert_same_run(a: Path, b: Path, weights: str = "final") -> None:
    """Every metrics.jsonl record equal (numbers within 1e-6, LR exact) and the final weights within 1e-6."""
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [(r["step"], sorted(r)) for r in ra] == [(r["step"], sorted(r)) for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for key in set(x) - MEASURED:
            if isinstance(x[key], float) and key not in ("lr", "lr_after_training", "epoch"):
                assert abs(x[key] - y[key]) <= 1e-6, (key, x, y)  # losses, grad norms, eval metrics
            else:
                assert x[key] == y[key], (key, x, y)  # LRs exactly, counts, steps
    assert max_weight_diff(load_weights(a / weights), load_weights(b / weights)) <= 1e-6


def assert_same_training(ours: Path, reference: Path, rel: float) -> None:
    """The same steps, tokens and LRs, and losses, gradient norms, eval losses and final weights within
    `rel` (relative; weights absolute) of a run on another topology."""
    a, b = train_records(ours), train_records(reference)
    assert [(r["step"], r["tokens"], r["lr"]) for r in a] == [(r["step"], r["tokens"], r["lr"]) for r in b]
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= rel * abs(y["loss"]), (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) <= rel * abs(y["grad_norm"]), (x, y)
    ea, eb = eval_records(ours), eval_records(reference)
    assert [r["step"] for r in ea] == [r["step"] for r in eb]
    for x, y in zip(ea, eb, strict=True):
        assert abs(x["eval_loss"] - y["eval_loss"]) <= rel * y["eval_loss"], (x, y)
    assert max_weight_diff(load_weights(ours / "final"), load_weights(reference / "final")) <= rel


# ---------------------------------------------------------------- tiny models and data
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Small configs of each decoder family the recipes support; sizes keep a CPU step in milliseconds.
TINY_DECODERS = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "llama_tied": dict(model_type="llama", tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=True, head_dim=8),
}
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_chat_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the bundled SFT data, with a ChatML template."""
    texts = []
    for line in (SFT_DATA / "train.jsonl").read_text().splitlines():
        for turn in json.loads(line)["messages"]:
            texts.append(turn["content"])
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    return fast


def make_tiny_decoder(
    directory: Path, family: str = "llama", seed: int = 0, num_layers: int = 2, attention_dropout: float = 0.0
) -> Path:
    """A randomly initialised decoder of `family` plus the test tokenizer, saved as a model directory."""
    directory = Path(directory)
    tokenizer = make_chat_tokenizer(directory)
    spec = dict(TINY_DECODERS[family])
    config = AutoConfig.for_model(
        spec.pop("model_type"),
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        attention_dropout=attention_dropout,
        **spec,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def make_tiny_encoder(directory: Path, seed: int = 0, initializer_range: float = 0.02) -> Path:
    """A random 2-layer BERT (no dropout) and a word-level BERT tokenizer over the bundled train texts."""
    directory.mkdir(parents=True, exist_ok=True)
    words = set()
    for row in read_jsonl(NEWS_DIR / "train.jsonl"):
        words.update(re.findall(r"[a-z]+|\d|[^\sa-z\d]", row["text"].lower()))
    (directory / "vocab.txt").write_text("\n".join(BERT_SPECIALS + sorted(words)) + "\n")
    tokenizer = BertTokenizer(vocab_file=str(directory / "vocab.txt"))
    tokenizer.save_pretrained(directory)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    return directory


def write_uneven_splits(directory: Path) -> Path:
    """A user's JSON Lines dataset cut from the bundled one: 50 / 37 / 29 samples (37 and 29 are odd)."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", 50), ("validation", 37), ("test", 29)):
        lines = (NEWS_DIR / f"{split}.jsonl").read_text().splitlines()[:size]
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def classify_args(model: Path, data: Path, output: Path, **overrides) -> list[str]:
    """The classification tests' job: micro batch 4, GA 2, 2 epochs, evaluated every 3 steps."""
    values = {
        "model_name_or_path": model,
        "dataset_name": data,
        "output_dir": output,
        "max_seq_length": 48,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "num_train_epochs": 2,
        "learning_rate": 3e-3,
        "warmup_ratio": 0.25,
        "eval_steps": 3,
        **overrides,
    }
    return ["--config", CLASSIFY_CONFIG, *[x for k, v in values.items() for x in (f"--{k}", str(v))]]


# ---------------------------------------------------------------- data files and what a recipe trains on
EXAMPLES = REPO / "recipes" / "data" / "examples"


def write_jsonl(path: Path, rows: list) -> Path:
    """A JSON Lines file of `rows`, one JSON value per line."""
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return Path(path)


def record_train_sets(monkeypatch, recipe: str = "sft") -> list:
    """The tokenised train sets a recipe run in this process hands to its DataLoader, in call order."""
    module = importlib.import_module(f"recipes.{recipe}")
    seen, original = [], module.make_train_loader

    def recording(data, cfg, collate_fn):
        seen.append(data)
        return original(data, cfg, collate_fn)

    monkeypatch.setattr(module, "make_train_loader", recording)
    return seen
