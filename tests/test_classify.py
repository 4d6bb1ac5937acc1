"""The classification recipe: bundled data, exact plan and schedule, metrics over every sample once."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import launch, load_plan, load_weights, max_weight_diff, read_jsonl, train_records
from sklearn.metrics import accuracy_score, f1_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizer,
)

from recipes.core.bundled_classification import LABELS, NEWS_DIR, SPLIT_SIZES, write_news_dataset
from recipes.core.plots import curve_series
from recipes.core.records import read_metrics
from recipes.core.steps import linear_warmup_decay_lr

CONFIG = "recipes/configs/classify_minilm.yaml"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tiny_encoder(directory: Path, seed: int = 0, initializer_range: float = 0.02) -> Path:
    """A random 2-layer BERT (no dropout) and a word-level BERT tokenizer over the bundled train texts."""
    directory.mkdir(parents=True, exist_ok=True)
    words = set()
    for row in read_jsonl(NEWS_DIR / "train.jsonl"):
        words.update(re.findall(r"[a-z]+|\d|[^\sa-z\d]", row["text"].lower()))
    (directory / "vocab.txt").write_text("\n".join(SPECIALS + sorted(words)) + "\n")
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


def run_args(model: Path, data: Path, output: Path, **overrides) -> list[str]:
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
    return ["--config", CONFIG, *[x for k, v in values.items() for x in (f"--{k}", str(v))]]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """Large random weights, so that predictions differ from sample to sample (8 steps teach it little)."""
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny_bert"), initializer_range=0.5)


@pytest.fixture(scope="module")
def two_proc_run(encoder, tmp_path_factory):
    """50 train samples, micro batch 4 on 2 processes, GA 2: 13 batches -> 7 per rank -> 4 steps per epoch.

    The model kept is the one of the lowest eval loss (a metric where lower is better).
    """
    root = tmp_path_factory.mktemp("classify")
    data = write_uneven_splits(root / "data")
    args = run_args(encoder, data, root / "out", metric_for_best_model="loss")
    launch("accelerate_configs/cpu_2proc.yaml", "recipes/classify.py", args)
    return root / "out", data


@torch.no_grad()
def predict_in_one_process(model_dir: Path, texts: list[str]) -> list[int]:
    """Predictions of the saved model in this process, one sample at a time (no padding, no sharding)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    return [
        int(model(**tokenizer(t, truncation=True, max_length=48, return_tensors="pt")).logits.argmax())
        for t in texts
    ]


def test_bundled_news_data_is_exactly_what_the_generator_writes(tmp_path):
    written = write_news_dataset(tmp_path / "news")
    for split in SPLIT_SIZES:
        assert (written / f"{split}.jsonl").read_bytes() == (NEWS_DIR / f"{split}.jsonl").read_bytes(), split


def test_bundled_news_data_has_every_class_in_every_split_and_no_shared_text():
    texts = {}
    for split, size in SPLIT_SIZES.items():
        rows = read_jsonl(NEWS_DIR / f"{split}.jsonl")
        assert len(rows) == size
        assert sorted({r["label"] for r in rows}) == LABELS
        texts[split] = {r["text"] for r in rows}
        assert len(texts[split]) == size
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]


def test_two_process_run_takes_the_planned_steps_at_the_planned_lrs(two_proc_run):
    out, _ = two_proc_run
    plan = load_plan(out)
    assert (plan["world_size"], plan["batches_per_epoch"], plan["batches_per_epoch_per_rank"]) == (2, 13, 7)
    assert (plan["optimizer_steps_per_epoch"], plan["total_optimizer_steps"], plan["warmup_steps"]) == (
        4,
        8,
        2,
    )
    records = train_records(out)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["lr"] for r in records] == [linear_warmup_decay_lr(s, 3e-3, 2, 8) for s in range(1, 9)]
    # Every sample of an epoch once, plus the 2 x 4 x 7 - 50 = 6 recycled to even out the last batches.
    assert [r["samples"] for r in records] == [16, 16, 16, 8] * 2


def test_test_metrics_count_every_sample_once_and_equal_one_process_predictions(two_proc_run):
    out, data = two_proc_run
    test_rows = read_jsonl(data / "test.jsonl")
    predictions = read_jsonl(out / "test_predictions.jsonl")
    assert [p["idx"] for p in predictions] == list(range(29))
    assert [p["label"] for p in predictions] == [r["label"] for r in test_rows]
    names = json.loads((out / "final" / "config.json").read_text())["id2label"]
    assert sorted(names.values()) == LABELS
    single = [names[str(i)] for i in predict_in_one_process(out / "final", [r["text"] for r in test_rows])]
    assert [p["prediction"] for p in predictions] == single
    results = json.loads((out / "eval_results.json").read_text())
    labels = [r["label"] for r in test_rows]
    assert results["num_samples"] == 29
    assert results["test_accuracy"] == accuracy_score(labels, single)
    assert results["test_f1"] == f1_score(labels, single, average="macro")


def test_eval_metric_on_uneven_validation_equals_one_process_metric_of_the_kept_model(two_proc_run):
    out, data = two_proc_run
    evals = [r for r in read_metrics(out) if "eval_f1" in r]
    assert [r["step"] for r in evals] == [0, 3, 6, 8]
    trained = evals[1:]
    kept = next(r for r in trained if r["eval_loss"] == min(e["eval_loss"] for e in trained))
    assert json.loads((out / "eval_results.json").read_text())["step"] == kept["step"]
    # Guard on this test's power: the kept model must differ from the last one and from its predictions.
    assert kept["step"] != 8 and kept["eval_accuracy"] != evals[-1]["eval_accuracy"]
    rows = read_jsonl(data / "validation.jsonl")
    names = json.loads((out / "final" / "config.json").read_text())["id2label"]
    single = [names[str(i)] for i in predict_in_one_process(out / "final", [r["text"] for r in rows])]
    labels = [r["label"] for r in rows]
    assert kept["eval_accuracy"] == accuracy_score(labels, single)
    assert kept["eval_f1"] == f1_score(labels, single, average="macro")


def test_run_leaves_tensorboard_loss_scalars_and_curves_of_every_step(two_proc_run):
    out, _ = two_proc_run
    records = train_records(out)
    events = list((out / "classify").glob("events.out.tfevents.*"))
    assert len(events) == 1
    scalars = EventAccumulator(str(events[0])).Reload().Scalars("loss")
    assert [e.step for e in scalars] == list(range(1, 9))
    assert [e.value for e in scalars] == [np.float32(r["loss"]) for r in records]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    series = curve_series(read_metrics(out))
    assert series["loss"][0] == series["lr"][0] == list(range(1, 9))
    assert series["eval_f1"][0] == series["eval_loss"][0] == [0, 3, 6, 8]


def test_accumulation_on_two_processes_equals_one_big_batch(tmp_path):
    """GA 2 x micro 2 x 2 processes and one process with batch 8 take the same 3 steps, to ~1e-6."""
    # BERT's usual init: with large weights Adam amplifies float rounding in near-zero gradients.
    encoder = make_tiny_encoder(tmp_path / "encoder")
    data = write_uneven_splits(tmp_path / "data")
    common = dict(
        max_steps=3,
        warmup_ratio=0.0,
        eval_split="null",
        test_split="null",
        metric_for_best_model="null",
        report_to="none",
        max_grad_norm=0.0,
    )
    launch(
        "accelerate_configs/cpu_2proc.yaml",
        "recipes/classify.py",
        run_args(
            encoder,
            data,
            tmp_path / "ddp",
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            **common,
        ),
    )
    launch(
        "accelerate_configs/cpu.yaml",
        "recipes/classify.py",
        run_args(
            encoder,
            data,
            tmp_path / "one",
            per_device_train_batch_size=8,
            gradient_accumulation_steps=1,
            **common,
        ),
    )
    ddp, one = train_records(tmp_path / "ddp"), train_records(tmp_path / "one")
    assert [r["samples"] for r in ddp] == [r["samples"] for r in one] == [8, 8, 8]
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    diff = max_weight_diff(load_weights(tmp_path / "ddp" / "final"), load_weights(tmp_path / "one" / "final"))
    assert diff < 1e-6
    assert not (tmp_path / "one" / "classify").exists()  # report_to none: no event files


def test_recipes_plan_for_classify_prints_what_the_run_did(two_proc_run, encoder, capsys):
    from recipes.cli import main as cli

    out, data = two_proc_run
    args = run_args(encoder, data, out)[2:]
    assert cli(["plan", "--config", CONFIG, "--num-processes", "2", "--json", *args]) == 0
    printed = json.loads(capsys.readouterr().out)
    plan = load_plan(out)
    assert {k: printed[k] for k in plan} == plan
