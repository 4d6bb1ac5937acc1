"""The shipped evaluate metrics equal scikit-learn; metric names resolve to them, others go to the Hub."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from recipes.classify import ClassifyConfig
from recipes.core.config import ConfigError
from recipes.core.data.classification import check_metric_config
from recipes.core.evaluation.classification import BestModel
from recipes.core.evaluation.metrics import (
    SHIPPED_DIR,
    compute_metrics,
    load_metrics,
    metric_path,
    shipped_metrics,
)


@pytest.fixture(scope="module")
def shipped():
    return load_metrics(["accuracy", "f1"])


def random_cases(seed: int, count: int = 25):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        n, k = int(rng.integers(1, 80)), int(rng.integers(2, 7))
        yield rng.integers(0, k, n), rng.integers(0, k, n), rng.random(n)


def test_shipped_metric_names_resolve_to_the_shipped_directories():
    assert shipped_metrics() == ["accuracy", "f1"]
    assert metric_path("accuracy") == str(SHIPPED_DIR / "accuracy")
    assert metric_path("f1") == str(SHIPPED_DIR / "f1")
    assert metric_path("precision") == "precision"  # not shipped: a Hub name


def test_accuracy_equals_scikit_learn_on_random_inputs(shipped):
    metric = shipped["accuracy"]
    for predictions, references, weights in random_cases(seed=0):
        assert metric.compute(predictions=predictions, references=references)["accuracy"] == accuracy_score(
            references, predictions
        )
        assert metric.compute(predictions=predictions, references=references, sample_weight=weights)[
            "accuracy"
        ] == accuracy_score(references, predictions, sample_weight=weights)
        assert metric.compute(predictions=predictions, references=references, normalize=False)[
            "accuracy"
        ] == accuracy_score(references, predictions, normalize=False)


@pytest.mark.parametrize("average", ["macro", "micro", "weighted", None])
def test_f1_equals_scikit_learn_on_random_inputs(shipped, average):
    metric = shipped["f1"]
    for predictions, references, weights in random_cases(seed=1):
        for kwargs in ({}, {"sample_weight": weights}, {"labels": [0, 2, 9]}):
            ours = metric.compute(predictions=predictions, references=references, average=average, **kwargs)[
                "f1"
            ]
            theirs = f1_score(references, predictions, average=average, zero_division=0, **kwargs)
            assert np.array_equal(ours, theirs), (average, kwargs, ours, theirs)


def test_binary_f1_equals_scikit_learn_and_refuses_more_than_two_classes(shipped):
    metric = shipped["f1"]
    rng = np.random.default_rng(2)
    for _ in range(60):
        n = int(rng.integers(1, 50))
        predictions, references = rng.integers(0, 2, n), rng.integers(0, 2, n)
        ours = metric.compute(predictions=predictions, references=references)["f1"]
        assert ours == f1_score(references, predictions, zero_division=0)
    with pytest.raises(ValueError, match="average='binary' needs two classes, found \\[0, 1, 2\\]"):
        metric.compute(predictions=[0, 1, 2], references=[0, 1, 1])


def test_compute_metrics_merges_results_with_per_metric_arguments(shipped):
    results = compute_metrics(shipped, [0, 1, 2, 2], [0, 1, 1, 2], {"f1": {"average": "macro"}})
    assert results == {"accuracy": 0.75, "f1": f1_score([0, 1, 1, 2], [0, 1, 2, 2], average="macro")}


def test_a_metric_that_is_neither_shipped_nor_on_the_hub_names_the_shipped_ones():
    with pytest.raises(ValueError, match="cannot load metric 'no_such_metric_xyz'") as err:
        load_metrics(["no_such_metric_xyz"])
    assert "Shipped metrics (work offline): accuracy, f1" in str(err.value)


def test_metric_arguments_for_an_unlisted_metric_are_a_config_error():
    cfg = ClassifyConfig(metrics=["accuracy"], metric_kwargs={"f1": {"average": "macro"}})
    with pytest.raises(
        ConfigError, match=r"metric_kwargs has arguments for \['f1'\], which are not in metrics"
    ):
        check_metric_config(cfg)


def test_best_model_keeps_the_first_of_equal_scores_and_the_lowest_loss():
    best = BestModel("f1")
    assert [best.update(s, {"eval_f1": v}, dict) for s, v in [(1, 0.5), (2, 0.7), (3, 0.7), (4, 0.6)]] == [
        True,
        True,
        False,
        False,
    ]
    assert (best.step, best.value) == (2, 0.7)
    by_loss = BestModel("eval_loss")
    for step, value in [(1, 0.9), (2, 0.4), (3, 0.5)]:
        by_loss.update(step, {"eval_loss": value}, dict)
    assert (by_loss.step, by_loss.greater_is_better) == (2, False)
    with pytest.raises(ConfigError, match="metric_for_best_model 'eval_recall' is not among"):
        BestModel("recall").update(1, {"eval_f1": 1.0}, dict)
