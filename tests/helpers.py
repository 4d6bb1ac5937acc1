"""What the tests share: tiny models and data built locally (nothing downloaded), the one way to run a recipe
(the real `accelerate launch`, or its `main` in this process for one-process runs), the shared tiny job,
and readers and comparisons of what a run leaves behind."""

from __future__ import annotations

import csv
import dataclasses
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
import yaml
from launch_pool import WARM_LAUNCHES
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
    warm: bool = True,
) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run a recipe through the real `accelerate launch` (plain python without a config) on `port`, by
    default a free one, with the tests folder on its path; `launch_args` go to `accelerate launch` (e.g. a
    machine rank). With `exit_status`, through `recipes launch`, which is accelerate launch exiting with the
    recipe's own status.

    With `log`, start it in a session of its own with its output going to `log` and return the running
    launcher, for a test that signals its processes; otherwise wait and return the finished process
    (with `check`, a failure raises with the output). Such a run that is expected to succeed, on an
    accelerate config, with nothing else changed (environment, processes, port, launcher arguments) and
    without torch_compile, runs in a warm launch of that config (launch_pool.WarmLaunches) unless `warm` is false."""
    script = script if script.endswith(".py") else f"recipes/{script}.py"
    config = None if accelerate_config is None else str(REPO / accelerate_config)
    cmd = launch_command(str(REPO / script), args, config, num_processes, port=port or free_port())
    cmd[cmd.index(str(REPO / script)) : cmd.index(str(REPO / script))] = launch_args
    if exit_status:
        assert cmd[1:3] == ["-m", "accelerate.commands.launch"], cmd
        cmd[1:3] = ["-m", "recipes.cli", "launch"]
    # The tests folder on the path, as it is for a warm launch's processes (they run tests/launch_pool.py):
    # a job may name a function of a test module (a GRPO reward).
    python_path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, **OFFLINE, "PYTHONPATH": python_path, **(env or {})}
    if log is not None:
        output = open(log, "w")  # noqa: SIM115 - the child writes to it until the test waits for it
        return subprocess.Popen(
            cmd, cwd=REPO, env=full_env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    warm = warm and check and not (exit_status or env or launch_args or port or num_processes)
    if warm and config is not None and script.startswith("recipes/") and "--torch_compile" not in args:
        result = WARM_LAUNCHES.run(config, Path(script).stem, [str(a) for a in args], full_env, timeout)
    else:
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


# ---------------------------------------------------------------- float rounding
# Two computations of one quantity that add in different orders (chunks, kernels, thread counts, ranks)
# agree only to rounding, and each comparison is held to what rounding can change. Every float32 operation
# is exact to within u = 2^-24 of its result (relative): a sum of n terms lies within n*u of the exact sum,
# relative to the sum of its terms' magnitudes (Higham, Accuracy and Stability of Numerical Algorithms,
# 2nd ed., section 4.2), so two orders of it within 2*n*u; sums that feed one another add their lengths.
FLOAT32_UNIT_ROUNDOFF = 2.0**-24
FLOAT64_UNIT_ROUNDOFF = 2.0**-53  # Python's floats
BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits


def float32_tolerance(n_terms: int, scale: float) -> float:
    """How far apart two float32 evaluations of one sum of `n_terms` terms can lie when they add in
    different orders; `scale` is the sum of the terms' magnitudes (for terms of one sign, the sum itself)."""
    return 2 * n_terms * FLOAT32_UNIT_ROUNDOFF * scale


def forward_terms(config, positions: int) -> int:
    """The terms a transformer's output adds up along its deepest chain of sums: per layer its two norms,
    the query/key/value, output and MLP input projections over the hidden size, the attention's scores
    over a head (at most the hidden size), its softmax and weighted values over `positions`, and the MLP's
    output projection over the intermediate size; then a final norm (or pooler) and the head over the
    hidden size."""
    hidden, intermediate = config.hidden_size, config.intermediate_size
    return config.num_hidden_layers * (6 * hidden + 2 * positions + intermediate) + 2 * hidden


@dataclasses.dataclass(frozen=True)
class Sums:
    """The lengths of the chains of sums a job's numbers add up: its model's `config` on sequences of up to
    `length` positions, `step_sequences` of them per optimizer step and `eval_sequences` per evaluation,
    its losses a log-softmax over `outputs` (the vocabulary, or the labels)."""

    config: object
    length: int
    step_sequences: int
    eval_sequences: int
    outputs: int

    def loss(self, items: int) -> int:
        """A loss (or log-probability) summed over `items` tokens or samples: the forward, the log-softmax,
        the sum. Held relative to the loss, which for the tests' barely trained models (a loss near the
        log of the number of outputs) is larger than the logits the forward rounds."""
        return forward_terms(self.config, self.length) + self.outputs + items

    @property
    def eval_loss(self) -> int:
        return self.loss(self.eval_sequences * self.length)

    @property
    def gradient(self) -> int:
        """A step's gradient: the forward, the log-softmax, the backward through the same sums, then one
        term per position of the step's sequences."""
        return 2 * forward_terms(self.config, self.length) + self.outputs + self.step_sequences * self.length


def run_sums(run: Path) -> Sums:
    """The sums of the SFT or classification job that `run` ran, from what it left: its model and
    max_seq_length (config.yaml), its samples per optimizer step and evaluation samples (plan.json); a
    classifier's log-softmax is over its labels."""
    recipe = yaml.safe_load((Path(run) / "config.yaml").read_text())
    plan, config = load_plan(run), AutoConfig.from_pretrained(recipe["model_name_or_path"])
    length, per_step, data = recipe["max_seq_length"], plan["samples_per_step"], plan["data"]
    if "classes" in data:
        evals = data["samples"].get(recipe["eval_split"], 0)
        return Sums(config, length, per_step, evals, outputs=len(data["classes"]))
    return Sums(config, length, per_step, data["eval_samples"], outputs=config.vocab_size)


def weight_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The Euclidean distance between two sets of weights, every tensor together."""
    assert a.keys() == b.keys(), a.keys() ^ b.keys()
    return sum((a[k].double() - b[k].double()).pow(2).sum().item() for k in a) ** 0.5


def adam_tolerance(n_terms: int, lrs: list[float], n_weights: int) -> float:
    """How far apart (weight_distance) rounding can put the weights of two AdamW runs at the LRs `lrs`
    whose gradients add chains of `n_terms` terms in different orders. Each step's gradient then differs by
    up to 2 n u of its norm; Adam divides it elementwise by its running RMS, which carries that relative
    difference into the step, and moves each of the `n_weights` weights by at most about the LR, so a step
    is at most lr * sqrt(n_weights) long. Weight by weight no such bound holds: the rounding of a gradient
    component that nearly cancels is as large as the component, and Adam scales it up to a step of about
    the LR; in norm such components are few."""
    return float32_tolerance(n_terms, sum(lrs) * n_weights**0.5)


def loss_tolerance(
    loss: float, n_terms: int, records: list[dict], after_step: int, n_weights: int, gradient_terms: int
) -> float:
    """How far rounding can move a loss, a mean of positive per-token (or per-sample) losses along a chain
    of `n_terms` terms, between two runs of a job whose training `records` are given, computed after
    optimizer step `after_step`: its own rounding, plus the distance those steps can have put between the
    runs' weights (adam_tolerance of gradients of `gradient_terms` terms) times the loss's gradient norm,
    taken as the largest the run recorded."""
    lrs = [r["lr"] for r in records if r["step"] <= after_step]
    gradient = max(r["grad_norm"] for r in records)
    return float32_tolerance(n_terms, loss) + gradient * adam_tolerance(gradient_terms, lrs, n_weights)


def step_loss_tolerance(
    record: dict, records: list[dict], sums: Sums, n_weights: int, count: str = "tokens"
) -> float:
    """loss_tolerance of the loss of `record`, a training record of the reference run's `records`, over
    its `count` tokens (or samples), computed before its step."""
    terms = sums.loss(record[count])
    return loss_tolerance(record["loss"], terms, records, record["step"] - 1, n_weights, sums.gradient)


def eval_loss_tolerance(record: dict, records: list[dict], sums: Sums, n_weights: int) -> float:
    """loss_tolerance of the eval loss of `record`, an eval record of the run whose training `records` are
    given, computed after its step."""
    return loss_tolerance(
        record["eval_loss"], sums.eval_loss, records, record["step"], n_weights, sums.gradient
    )


def bf16_loss_tolerance(
    loss: float, records: list[dict], after_step: int, n_weights: int, roundings: int = 2
) -> float:
    """How far a loss computed in bf16 can lie from the fp32 run's (or another bf16 run's), after optimizer
    step `after_step` of the reference run's training `records`. bf16 rounds each input of a matmul to
    within u = 2^-8: the head's two inputs (hidden states and weight) put the logits, and with them the loss
    (the log-softmax and the mean run in fp32), within 2 u. The gradients carry as many roundings (3 where
    they are also reduced in bf16: `roundings`), so Adam's steps differ by that share of their length,
    lr * sqrt(n_weights) (adam_tolerance), which moves the loss by at most its gradient's norm times that."""
    lrs = [r["lr"] for r in records if r["step"] <= after_step]
    gradient = max(r["grad_norm"] for r in records)
    return roundings * BF16_UNIT_ROUNDOFF * (loss + gradient * sum(lrs) * n_weights**0.5)


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
    """Every metrics.jsonl record equal and the final weights equal, bit for bit: a resumed run repeats the
    uninterrupted run's float operations in the same order on the same values, which give the same floats."""
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    keys = [[(r["step"], sorted(set(r) - {"memory_census"})) for r in run] for run in (ra, rb)]
    assert keys[0] == keys[1]  # a memory census is a probe one of the runs may have been asked for
    for x, y in zip(ra, rb, strict=True):
        for key in set(x) - MEASURED:
            assert x[key] == y[key], (key, x, y)  # losses, grad norms, eval metrics, LRs, counts, steps
    assert max_weight_diff(load_weights(a / weights), load_weights(b / weights)) == 0.0


def assert_same_training(ours: Path, reference: Path) -> None:
    """The same steps, tokens and LRs as the shared job's run on another topology, which adds in another
    order, and its losses, gradient norms, eval losses and final weights to that order's rounding."""
    a, b = train_records(ours), train_records(reference)
    assert [(r["step"], r["tokens"], r["lr"]) for r in a] == [(r["step"], r["tokens"], r["lr"]) for r in b]
    theirs, sums = load_weights(reference / "final"), run_sums(reference)
    n_weights = sum(t.numel() for t in theirs.values())
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= step_loss_tolerance(y, b, sums, n_weights), (x, y)
        # the gradient's rounding moves its norm by no more, relatively
        assert abs(x["grad_norm"] - y["grad_norm"]) <= float32_tolerance(sums.gradient, y["grad_norm"])
    ea, eb = eval_records(ours), eval_records(reference)
    assert [r["step"] for r in ea] == [r["step"] for r in eb]
    for x, y in zip(ea, eb, strict=True):
        assert abs(x["eval_loss"] - y["eval_loss"]) <= eval_loss_tolerance(y, b, sums, n_weights), (x, y)
    tolerance = adam_tolerance(sums.gradient, [r["lr"] for r in b], n_weights)
    assert weight_distance(load_weights(ours / "final"), theirs) <= tolerance


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


def write_csv(path: Path, rows: list[dict]) -> Path:
    """A CSV file of `rows`, as a spreadsheet exports them: a value that is not a string (a message list)
    becomes its JSON text in the cell."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items()})
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
