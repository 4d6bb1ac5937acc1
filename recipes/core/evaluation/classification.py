"""Evaluating a classifier: loss, metrics and predictions gathered from every rank, the test results
written out, and the best model kept across evaluations."""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
import torch.nn.functional as F

from recipes.core.config import ConfigError
from recipes.core.data.classification import classifier_inputs
from recipes.core.evaluation.metrics import compute_metrics


@torch.no_grad()
def predict_and_score(accelerator, model, loader, metrics, metric_kwargs) -> tuple[dict, dict[str, list]]:
    """Mean loss and metrics over the whole split, and its predictions gathered from every rank.

    gather_for_metrics drops the samples that uneven sharding repeats, so each sample counts once.
    """
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"loss": [], "prediction": [], "label": [], "idx": []}
    for batch in loader:
        logits = model(**classifier_inputs(batch)).logits.float()
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")
        gathered = accelerator.gather_for_metrics((losses, logits.argmax(-1), batch["labels"], batch["idx"]))
        for key, value in zip(parts, gathered, strict=True):
            parts[key].append(value.cpu())
    model.train()
    out = {key: torch.cat(values).tolist() for key, values in parts.items()}
    results = {"loss": sum(out["loss"]) / len(out["loss"])}
    results.update(compute_metrics(metrics, out["prediction"], out["label"], metric_kwargs))
    return results, out


def write_test_results(output_dir: str, results: dict, predictions: dict, label_names: list[str]) -> None:
    """eval_results.json (the numbers) and test_predictions.jsonl (one row per sample, in split order)."""
    with open(f"{output_dir}/eval_results.json", "w") as f:
        f.write(json.dumps(results, indent=2) + "\n")
    rows = sorted(zip(predictions["idx"], predictions["label"], predictions["prediction"], strict=True))
    with open(f"{output_dir}/test_predictions.jsonl", "w") as f:
        for idx, label, prediction in rows:
            row = {"idx": idx, "label": label_names[label], "prediction": label_names[prediction]}
            f.write(json.dumps(row) + "\n")


class BestModel:
    """The weights of the best evaluation so far by one eval value, kept in CPU memory.

    `metric` is a key of the eval results with or without its "eval_" prefix ("f1", "eval_loss");
    None keeps nothing. Ties keep the earlier step.
    """

    def __init__(self, metric: str | None, greater_is_better: bool | None = None):
        self.key = None if metric is None else (metric if metric.startswith("eval_") else f"eval_{metric}")
        if greater_is_better is None:
            greater_is_better = self.key is not None and not self.key.endswith("loss")
        self.greater_is_better = greater_is_better
        self.step: int | None = None
        self.value: float | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def update(self, step: int, results: dict, state_dict: Callable[[], dict]) -> bool:
        if self.key is None:
            return False
        if self.key not in results:
            raise ConfigError(
                f"metric_for_best_model {self.key!r} is not among the eval results {sorted(results)}"
            )
        value = results[self.key]
        if self.value is not None and not (
            value > self.value if self.greater_is_better else value < self.value
        ):
            return False
        self.step, self.value = step, value
        self.state = {k: v.detach().cpu().clone() for k, v in state_dict().items()}
        return True

    # Registered for checkpointing, so that a resumed run keeps the best model of the steps before it.
    def state_dict(self) -> dict:
        return {"step": self.step, "value": self.value, "state": self.state}

    def load_state_dict(self, saved: dict) -> None:
        self.step, self.value, self.state = saved["step"], saved["value"], saved["state"]
