"""F1 score, the harmonic mean of precision and recall, with scikit-learn's averaging conventions.

Shipped with the recipes so that `evaluate.load("recipes/metrics/f1")` works offline. Per class,
F1 = 2 TP / (2 TP + FP + FN); a class with no prediction and no reference scores 0.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "F1 = 2 * precision * recall / (precision + recall), per class or averaged over classes."
_INPUTS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    labels (list of int, optional): classes to score (default: every class seen in predictions or references).
    pos_label (int): the positive class when average="binary" (default 1).
    average (str or None): "binary" (default), "micro", "macro", "weighted", or None for one score per class.
    sample_weight (list of float, optional): per-sample weights.
Returns:
    {"f1": float, or a list of floats when average is None}
"""
_AVERAGES = ("binary", "micro", "macro", "weighted", None)


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(
        self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None
    ):
        if average not in _AVERAGES:
            raise ValueError(f"average must be one of {_AVERAGES}, got {average!r}")
        predictions, references = np.asarray(predictions), np.asarray(references)
        present = np.unique(np.concatenate([predictions, references]))
        if average == "binary":
            if len(present) > 2 or not set(present.tolist()) <= {0, 1, pos_label}:
                raise ValueError(
                    f"average='binary' needs two classes, found {present.tolist()}; "
                    "pass average='macro', 'micro' or 'weighted' for more than two classes"
                )
            labels = [pos_label]
        elif labels is None:
            labels = present
        # Per-class sums by bincount in sample order, so that weighted sums round exactly as scikit-learn's.
        weights = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        pred_index, true_index = np.searchsorted(present, predictions), np.searchsorted(present, references)
        hit = predictions == references
        size = len(present)
        tp_all = np.bincount(
            true_index[hit], weights=None if weights is None else weights[hit], minlength=size
        )
        true_all = np.bincount(true_index, weights=weights, minlength=size)
        pred_all = np.bincount(pred_index, weights=weights, minlength=size)
        labels = np.asarray(labels)
        found = np.isin(labels, present)
        pick = np.searchsorted(present, labels[found])
        tp, true_sum, pred_sum = (np.zeros(len(labels)) for _ in range(3))
        tp[found], true_sum[found], pred_sum[found] = tp_all[pick], true_all[pick], pred_all[pick]
        # Through the confusion-matrix cells, as scikit-learn does: tp + fp and tp + fn, not the raw sums.
        pred_sum, true_sum = tp + (pred_sum - tp), tp + (true_sum - tp)
        if average == "micro":
            tp, true_sum, pred_sum = (
                np.array([tp.sum()]),
                np.array([true_sum.sum()]),
                np.array([pred_sum.sum()]),
            )
        denominator = true_sum + pred_sum
        scores = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator != 0)
        if average is None:
            return {"f1": scores.tolist()}
        if average == "weighted":
            return {"f1": float(np.average(scores, weights=true_sum)) if true_sum.sum() else 0.0}
        return {"f1": float(np.average(scores))}
