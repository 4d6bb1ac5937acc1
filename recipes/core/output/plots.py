"""Plots of a run and of a plan: curves.png at the end of every run, and `recipes plan --plot`.

The series are computed by plain functions (tested) and drawn by thin matplotlib code. Figures are
built without pyplot, so no display or global backend is involved.
"""

from __future__ import annotations

from pathlib import Path

from recipes.core.plan.steps import linear_warmup_decay_lr

Series = tuple[list[int], list[float]]


def curve_series(records: list[dict]) -> dict[str, Series]:
    """Per metrics.jsonl key, (optimizer steps, values): train "loss" and "lr", and every "eval_*" key."""
    series: dict[str, Series] = {}
    for record in records:
        keys = ("loss", "lr") if "loss" in record else [k for k in record if k.startswith("eval_")]
        for key in keys:
            if isinstance(record.get(key), (int, float)):
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(float(record[key]))
    return series


def write_curves(records: list[dict], path: str | Path) -> Path:
    """Draw train/eval loss, eval metrics and LR of a run's metrics.jsonl `records` against optimizer step."""
    series = curve_series(records)
    metric_keys = sorted(k for k in series if k.startswith("eval_") and k != "eval_loss")
    panels = [["loss", "eval_loss"], metric_keys, ["lr"]]
    panels = [[k for k in keys if k in series] for keys in panels]
    panels = [keys for keys in panels if keys] or [[]]
    fig = _figure(len(panels))
    for ax, keys in zip(fig.axes, panels, strict=True):
        for key in keys:
            steps, values = series[key]
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if keys:
            ax.legend()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def schedule_series(plan: dict) -> tuple[list[int], list[float], int, list[int]]:
    """The LR of every optimizer step a plan implies, the warmup's last step, and each epoch's last step."""
    total, warmup = plan["total_optimizer_steps"], plan["warmup_steps"]
    steps = list(range(1, total + 1))
    lrs = [linear_warmup_decay_lr(s, plan["learning_rate"], warmup, total) for s in steps]
    per_epoch = plan["optimizer_steps_per_epoch"]
    epoch_ends = list(range(per_epoch, total + 1, per_epoch))
    return steps, lrs, warmup, epoch_ends


def write_schedule_plot(plan: dict, path: str | Path) -> Path:
    steps, lrs, warmup, epoch_ends = schedule_series(plan)
    fig = _figure(1)
    ax = fig.axes[0]
    ax.plot(steps, lrs, label="learning rate")
    if warmup:
        ax.axvline(warmup, color="tab:orange", linestyle="--", label=f"warmup ends (step {warmup})")
    for i, end in enumerate(epoch_ends):
        ax.axvline(end, color="gray", linestyle=":", label="epoch end" if i == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(
        f"{plan['total_optimizer_steps']} steps, global batch {plan['global_batch_size']}, "
        f"world size {plan['world_size']}"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _figure(panels: int):
    from matplotlib.figure import Figure  # imported here: only runs that plot pay for matplotlib

    fig = Figure(figsize=(6 * panels, 4), layout="constrained")
    fig.subplots(1, panels, squeeze=False)
    return fig
