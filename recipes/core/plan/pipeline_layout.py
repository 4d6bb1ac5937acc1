"""Pipeline-parallel layout arithmetic: pure functions, no torch or deepspeed import.

A pipeline of p stages runs the embedding, the decoder layers and the final norm + LM head in order.
The decoder layers are split as evenly as possible (the first stages take one more when they do not
divide), the embedding joins the first stage and the norm + head join the last. This is the split
DeepSpeed's PipelineModule makes with partition_method "type:<decoder layer class>", which the recipe
uses, so what `recipes plan` prints is what the run builds (the tests check both against each other).
"""

from __future__ import annotations

# Above this share of idle stage time the plan suggests more micro-batches per step.
BUBBLE_ADVICE_THRESHOLD = 0.2


def check_pipeline_stages(num_layers: int, stages: int) -> None:
    if stages < 1:
        raise ValueError(f"pipeline_stages must be a positive integer, got {stages}")
    if stages > num_layers:
        raise ValueError(
            f"pipeline_stages {stages} is more than the model's {num_layers} decoder layers; every stage needs at "
            f"least one decoder layer: use pipeline_stages <= {num_layers}"
        )


def decoder_layer_ranges(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """[start, stop) of the decoder layers each stage holds."""
    check_pipeline_stages(num_layers, stages)
    base, extra = divmod(num_layers, stages)
    ranges, start = [], 0
    for stage in range(stages):
        stop = start + base + (1 if stage < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def module_boundaries(num_layers: int, stages: int) -> list[int]:
    """Boundaries in the pipeline's module list [embedding, L decoder layers, final norm, LM head]:
    stage s runs modules boundaries[s]..boundaries[s+1]-1 (DeepSpeed's `parts`)."""
    ranges = decoder_layer_ranges(num_layers, stages)
    return [0] + [stop + 1 for _, stop in ranges[:-1]] + [num_layers + 3]


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """Share of each step a stage sits idle while the pipeline fills and drains: (p-1)/(m+p-1)."""
    if stages < 1 or micro_batches < 1:
        raise ValueError(f"stages and micro_batches must be positive, got {stages} and {micro_batches}")
    return (stages - 1) / (micro_batches + stages - 1)


def micro_batches_for_bubble(stages: int, target: float = BUBBLE_ADVICE_THRESHOLD) -> int:
    """Fewest micro-batches per step that keep the bubble at or below `target`."""
    micro = 1
    while bubble_fraction(stages, micro) > target:
        micro += 1
    return micro


def pipeline_view(num_layers: int, stages: int, data_parallel_size: int, micro_batches: int) -> dict:
    """What `recipes plan` shows for a pipeline run (micro_batches = gradient accumulation steps)."""
    ranges = decoder_layer_ranges(num_layers, stages)
    partition = []
    for stage, (start, stop) in enumerate(ranges):
        parts = (["embedding"] if stage == 0 else []) + [
            f"layers {start}-{stop - 1}" if stop - start > 1 else f"layer {start}"
        ]
        parts += ["norm + lm_head"] if stage == stages - 1 else []
        partition.append(f"stage {stage}: " + ", ".join(parts))
    bubble = bubble_fraction(stages, micro_batches)
    advice = None
    if bubble > BUBBLE_ADVICE_THRESHOLD:
        needed = micro_batches_for_bubble(stages)
        advice = (
            f"stages idle {bubble:.0%} of each step; use at least {needed} micro-batches per step (raise "
            f"global_batch_size or lower per_device_train_batch_size) or fewer pipeline_stages"
        )
    return {
        "pipeline_stages": stages,
        "data_parallel_size": data_parallel_size,
        "micro_batches_per_step": micro_batches,
        "num_decoder_layers": num_layers,
        "layer_partition": partition,
        "bubble_fraction": bubble,
        "bubble_advice": advice,
    }
