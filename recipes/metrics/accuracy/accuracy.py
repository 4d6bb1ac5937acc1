"""Accuracy: the fraction of predictions equal to their reference (scikit-learn's accuracy_score).

Shipped with the recipes so that `evaluate.load("recipes/metrics/accuracy")` works offline.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy = correct predictions / all predictions, optionally weighted per sample."
_INPUTS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    normalize (bool): return the fraction (default) rather than the (weighted) number of correct predictions.
    sample_weight (list of float, optional): per-sample weights.
Returns:
    {"accuracy": float}
"""


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = (np.asarray(predictions) == np.asarray(references)).astype(np.float64)
        if normalize:
            return {"accuracy": float(np.average(correct, weights=sample_weight))}
        if sample_weight is not None:
            return {"accuracy": float(np.dot(correct, np.asarray(sample_weight, dtype=np.float64)))}
        return {"accuracy": float(correct.sum())}
