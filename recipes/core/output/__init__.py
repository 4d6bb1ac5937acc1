"""What a run leaves behind: the run directory and its checkpoints, plan.json / metrics.jsonl / config.yaml,
trackers, curves.png and the final model."""
