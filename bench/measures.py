"""Pure arithmetic of the benchmark: medians of side-by-side ratios, padding waste, model FLOPs."""

from __future__ import annotations

import math
import random
import statistics

from recipes.core.plan.flops import training_flops
from recipes.core.plan.model_shape import ModelShape


def throughput(result: dict) -> float:
    """Target (assistant) tokens trained per second of training loop."""
    return result["target_tokens"] / result["runtime"]


def median_ratio(numerators: list[dict], denominators: list[dict]) -> dict:
    """Throughput ratios of runs made side by side (repetition i of both), their median and range."""
    ratios = [throughput(a) / throughput(b) for a, b in zip(numerators, denominators, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "all": ratios}


def batches_of(order: list[int], micro_batch: int) -> list[list[int]]:
    return [order[i : i + micro_batch] for i in range(0, len(order), micro_batch)]


def real_token_fraction(lengths: list[int], batches: list[list[int]], packing: bool) -> float:
    """Share of the token slots an epoch processes that hold sample tokens: a padded batch is as wide
    as its longest sample; a packed (padding-free) batch is exactly its samples."""
    if packing:
        return 1.0  # every slot of a packed row is a sample token
    real = sum(lengths[i] for batch in batches for i in batch)
    slots = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return real / slots


def long_tailed_lengths(count: int, median: int, sigma: float, cap: int, seed: int = 0) -> list[int]:
    """Sample lengths from a log-normal distribution (most short, a few very long), cut at `cap` as
    max_seq_length would, at least 8 tokens."""
    rng = random.Random(seed)
    return [min(cap, max(8, round(median * math.exp(rng.gauss(0.0, sigma))))) for _ in range(count)]


def model_flops_per_second(shape: ModelShape, tokens: int, mean_seq_len: float, seconds: float) -> float:
    """Model FLOP/s of a training run over `tokens` real tokens in sequences of `mean_seq_len`: 6 x
    non-embedding parameters per token plus the attention term 12 x layers x attention dim x seq len."""
    return training_flops(shape, tokens, mean_seq_len) / seconds


def mfu(model_flops_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's dense peak FLOP/s."""
    return model_flops_per_s / peak_flops
