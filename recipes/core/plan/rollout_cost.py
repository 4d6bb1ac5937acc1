"""What a GRPO run costs and how its step time splits between sampling and training. Pure, no torch.

Per generation batch (B completions of P prompt and C completion tokens, over R data-parallel ranks):
- sampling: a prefill forward over the prompts, then C decoding steps, each a forward of one token per
  completion against its cache. A decoding step on a rank reads the weights once and its rows' cached keys
  and values, and computes 2 x non-embedding params FLOPs per row: on GPUs it is bound by memory bandwidth
  until the rows are many. Its time here is the larger of bytes read / datasheet bandwidth and FLOPs /
  (peak x utilisation): a lower bound, since `generate` also spends a fixed host time per token that
  small models do not hide (`recipes plan --calibrate` measures it);
- forward passes over prompt + completion for logp_old (when the weights move between sampling and
  training) and for the reference (beta > 0);
- then each optimizer step trains forward + backward on its completions, prompt tokens included.
FLOPs follow flops.py; a forward is a third of forward + backward; a decoded token attends to P + C/2
tokens on average.
"""

from __future__ import annotations

from dataclasses import dataclass

from recipes.core.plan.flops import training_flops
from recipes.core.plan.model_shape import ModelShape

ROLLOUT_FORMULA = (
    "sampling: forward over prompts + C decoding steps, each max(weights + KV cache read / bandwidth, "
    "FLOPs / (peak x utilization)) per rank; logp passes: forwards over prompt + completion; "
    "training: 6 x params x tokens + attention per step"
)


@dataclass(frozen=True)
class RolloutShape:
    """What the estimate is computed for: a GRPO plan's counts and the mean token lengths."""

    data_parallel_size: int
    completions_per_generation_batch: int
    completions_per_step: int
    optimizer_steps_per_generation_batch: int
    generation_batches: int
    total_optimizer_steps: int
    prompt_len: float  # mean prompt tokens
    completion_len: float  # mean completion tokens (max_completion_length: an upper bound)
    old_logps: bool  # a forward for logp_old per generation batch
    reference: bool  # a reference forward per generation batch

    @property
    def rows_per_rank(self) -> float:
        return self.completions_per_generation_batch / self.data_parallel_size


def rollout_flops(run: RolloutShape, shape: ModelShape) -> dict[str, float]:
    """FLOPs over all ranks: per generation batch (prefill, decode, logp passes) and per optimizer step
    (training)."""
    B, P, C = run.completions_per_generation_batch, run.prompt_len, run.completion_len
    passes = int(run.old_logps) + int(run.reference)
    return {
        "prefill": training_flops(shape, B * P, P) / 3,
        "decode": training_flops(shape, B * C, P + C / 2) / 3,
        "logp_passes": passes * training_flops(shape, B * (P + C), P + C) / 3,
        "training_per_step": training_flops(shape, run.completions_per_step * (P + C), P + C),
    }


def decode_bytes_per_token(
    run: RolloutShape, shape: ModelShape, layer_weight_bytes: float, head_bytes: float, kv_bytes: float
) -> float:
    """Bytes a rank reads in one decoding step: the decoder layers' weights (`layer_weight_bytes` in all),
    the output head (`head_bytes` per value; the input embedding is only indexed) and its rows' cached keys
    and values (`kv_bytes` per value) at the mean context."""
    head = shape.vocab_size * shape.hidden_size if shape.has_lm_head else 0
    kv = 2 * shape.num_layers * shape.kv_dim * (run.prompt_len + run.completion_len / 2) * run.rows_per_rank
    return layer_weight_bytes + head * head_bytes + kv * kv_bytes


def rollout_seconds(
    run: RolloutShape,
    flops: dict[str, float],
    decode_bytes: float,
    peak_flops: float,
    bandwidth: float | None,
    utilization: float,
) -> dict[str, float | None]:
    """Seconds per rank: per generation batch (sampling, logp passes), per optimizer step (training, and
    the generation batch's share), and the run's. Sampling is None without a bandwidth for the device."""
    ranks, rate = run.data_parallel_size, peak_flops * utilization
    sampling = None
    if bandwidth is not None:
        decode_step_flops = flops["decode"] / ranks / run.completion_len
        step = max(decode_bytes / bandwidth, decode_step_flops / rate)
        sampling = flops["prefill"] / ranks / rate + run.completion_len * step
    logp = flops["logp_passes"] / ranks / rate
    training = flops["training_per_step"] / ranks / rate
    generation = None if sampling is None else sampling + logp
    steps = run.optimizer_steps_per_generation_batch
    per_step = None if generation is None else generation / steps + training
    return {
        "sampling_per_generation_batch": sampling,
        "logp_passes_per_generation_batch": logp,
        "training_per_step": training,
        "generation_per_step": None if generation is None else generation / steps,
        "generation_share": None if per_step is None else generation / steps / per_step,
        "run": None
        if generation is None
        else run.generation_batches * generation + run.total_optimizer_steps * training,
    }


def generation_memory_bytes(
    run: RolloutShape, shape: ModelShape, kv_bytes_per_value: float, gathered_weight_bytes: float
) -> float:
    """Bytes a rank holds while sampling beyond its model states: every row's key/value cache at full
    length, the fp32 logits of one token per row, and the whole weights where they are sharded (ZeRO-3,
    FSDP2 gather them for the generation batch; `gathered_weight_bytes` is 0 otherwise)."""
    rows, length = run.rows_per_rank, run.prompt_len + run.completion_len
    cache = 2 * shape.num_layers * shape.kv_dim * length * rows * kv_bytes_per_value
    logits = 4 * rows * shape.vocab_size if shape.has_lm_head else 0
    return cache + logits + gathered_weight_bytes
