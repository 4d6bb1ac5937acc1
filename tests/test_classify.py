"""The classification recipe: bundled data, exact plan and schedule, metrics over every sample once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    CLASSIFY_CONFIG,
    TWO_PROCESSES,
    adam_tolerance,
    classify_args,
    in_process,
    launch,
    load_plan,
    load_weights,
    make_tiny_encoder,
    read_jsonl,
    run_sums,
    step_loss_tolerance,
    train_records,
    weight_distance,
    write_jsonl,
    write_uneven_splits,
)
from sklearn.metrics import accuracy_score, f1_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from recipes.classify import ClassifyConfig, plan_data
from recipes.core.config import parse_config
from recipes.core.data.classification import load_classification_data
from recipes.core.errors import DataError
from recipes.core.output.plots import curve_series
from recipes.core.output.records import read_metrics
from recipes.core.plan.steps import linear_warmup_decay_lr
from recipes.data.generators.news_topics import LABELS, NEWS_DIR, SPLIT_SIZES, write_news_dataset


@pytest.fixture(scope="module")
def two_proc_run(classify_reference):
    """50 train samples, micro batch 4 on 2 processes, GA 2: 13 batches -> 7 per rank -> 4 steps per epoch.

    The model kept is the one of the lowest eval loss (a metric where lower is better)."""
    out, args = classify_reference("ddp")
    return out, Path(args[args.index("--dataset_name") + 1])


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_accumulation_on_two_processes_equals_one_big_batch(tmp_path):
    """GA 2 x micro 2 x 2 processes and one process with batch 8 take the same 3 steps, to rounding."""
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
        max_grad_norm=math.inf,  # nothing clipped, but the records hold the gradient's norm
    )
    ddp = classify_args(encoder, data, tmp_path / "ddp", per_device_train_batch_size=2, **common)
    launch(TWO_PROCESSES, "classify", ddp)
    one = classify_args(
        encoder,
        data,
        tmp_path / "one",
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        **common,
    )
    in_process("classify", one)
    ddp, one = train_records(tmp_path / "ddp"), train_records(tmp_path / "one")
    assert [r["samples"] for r in ddp] == [r["samples"] for r in one] == [8, 8, 8]
    theirs, sums = load_weights(tmp_path / "one" / "final"), run_sums(tmp_path / "one")
    n_weights = sum(t.numel() for t in theirs.values())
    for a, b in zip(ddp, one, strict=True):  # the same sums, added in another order
        assert abs(a["loss"] - b["loss"]) <= step_loss_tolerance(b, one, sums, n_weights, count="samples")
    tolerance = adam_tolerance(sums.gradient, [r["lr"] for r in one], n_weights)
    assert weight_distance(load_weights(tmp_path / "ddp" / "final"), theirs) <= tolerance
    assert not (tmp_path / "one" / "classify").exists()  # report_to none: no event files


@pytest.mark.slow
# ---------------------------------------------------------------- data: labels and texts
def classification_config(encoder: Path, data: Path) -> ClassifyConfig:
    return parse_config(ClassifyConfig, classify_args(encoder, data, data.parent / "out"))


def classification_data(encoder: Path, data: Path):
    return load_classification_data(
        classification_config(encoder, data), AutoTokenizer.from_pretrained(encoder)
    )


def test_integer_labels_are_the_class_ids_in_every_split(encoder, news_data, tmp_path):
    data = tmp_path / "news"
    data.mkdir()
    for split in ("train", "validation", "test"):
        rows = read_jsonl(news_data / f"{split}.jsonl")
        write_jsonl(data / f"{split}.jsonl", [{**row, "label": LABELS.index(row["label"])} for row in rows])
    loaded = classification_data(encoder, data)
    assert loaded.label_names == ["0", "1", "2", "3"]
    for split in ("train", "validation", "test"):
        rows = read_jsonl(data / f"{split}.jsonl")
        assert loaded.splits[split]["labels"] == [row["label"] for row in rows]


def test_rows_with_an_empty_text_are_dropped_counted_printed_and_recorded_in_every_split(
    encoder, news_data, tmp_path
):
    data = tmp_path / "news"
    data.mkdir()
    emptied = {"train": (2, 4), "validation": (1,), "test": ()}
    for split, rows_to_empty in emptied.items():
        rows = read_jsonl(news_data / f"{split}.jsonl")
        for row in rows_to_empty:
            rows[row]["text"] = "" if row != 4 else " \n "
        write_jsonl(data / f"{split}.jsonl", rows)
    loaded = classification_data(encoder, data)
    sizes = {"train": 50, "validation": 37, "test": 29}
    for split, rows_to_empty in emptied.items():
        assert loaded.splits[split]["idx"] == [i for i in range(sizes[split]) if i not in rows_to_empty]
    assert loaded.summary().splitlines() == [
        f"train data: split 'train' of {data}: 50 rows: 48 kept, 2 dropped (empty text)",
        f"eval data: split 'validation' of {data}: 37 rows: 36 kept, 1 dropped (empty text)",
        f"test data: split 'test' of {data}: 29 rows: 29 kept, 0 dropped (empty text)",
        f"train samples: 48, classes: {LABELS}",
    ]
    record = loaded.to_dict()  # plan.json's data
    assert record["samples"] == {"train": 48, "validation": 36, "test": 29}
    assert record["splits"]["train"] == {
        "role": "train",
        "dataset": str(data),
        "split": "train",
        "rows": 50,
        "samples": 48,
        "dropped": 2,
    }
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    assert plan_data(classification_config(encoder, data), lambda: tokenizer)[1] == record

    write_jsonl(data / "train.jsonl", [{**row, "text": ""} for row in read_jsonl(data / "train.jsonl")])
    with pytest.raises(DataError) as err:
        classification_data(encoder, data)
    assert str(err.value) == (
        f"none of the 50 rows of split 'train' of {data} has a text to classify (empty text in every row); "
        "check text_column 'text'"
    )


@pytest.mark.slow  # plans the DDP reference run, which is launched
def test_recipes_plan_for_classify_prints_what_the_run_did(classify_reference, capsys):
    from recipes.cli import main as cli

    out, args = classify_reference("ddp")
    assert args[:2] == ["--config", CLASSIFY_CONFIG]
    assert cli(["plan", *args, "--num-processes", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    plan = load_plan(out)
    assert {k: printed[k] for k in plan} == plan
