"""Evaluation metrics through the `evaluate` library, shipped modules first.

`evaluate.load("accuracy")` fetches the metric script from the Hub, which fails offline. The metrics
the recipes use by default live in recipes/metrics/<name>/<name>.py and are loaded by path; any other
name goes to `evaluate.load` as a Hub metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import evaluate

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "metrics"


def shipped_metrics() -> list[str]:
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def metric_path(name: str) -> str:
    """The shipped directory for `name` if there is one, else `name` itself (a Hub id or a local path)."""
    shipped = SHIPPED_DIR / name
    return str(shipped) if (shipped / f"{name}.py").is_file() else name


def load_metrics(names: list[str]) -> dict[str, evaluate.EvaluationModule]:
    """Load each metric once. Kept in memory: evaluate's on-disk cache clashes between processes."""
    loaded = {}
    for name in names:
        try:
            loaded[name] = evaluate.load(metric_path(name), keep_in_memory=True)
        except Exception as err:  # evaluate raises several types for "not found" and "offline"
            raise ValueError(
                f"cannot load metric {name!r}: {str(err).rstrip('.')}. Shipped metrics (work offline): {', '.join(shipped_metrics())}; "
                f"other names are fetched from the Hugging Face Hub and need network access"
            ) from None
    return loaded


def compute_metrics(
    metrics: dict[str, evaluate.EvaluationModule],
    predictions: list[int],
    references: list[int],
    metric_kwargs: dict[str, dict[str, Any]] | None = None,
) -> dict[str, float]:
    """All metric values, keyed by what each metric returns (e.g. "accuracy", "f1")."""
    results: dict[str, float] = {}
    for name, metric in metrics.items():
        kwargs = (metric_kwargs or {}).get(name, {})
        results.update(metric.compute(predictions=predictions, references=references, **kwargs))
    return results
