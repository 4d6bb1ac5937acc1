"""Evaluation metrics through the `evaluate` library, shipped metric modules first."""
