"""Benchmarks: what the recipes cost, measured side by side with what users would run instead."""
