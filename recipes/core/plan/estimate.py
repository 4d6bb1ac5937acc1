"""Compute, time and memory estimates of a run, before it starts.

Everything but `model_shape` is a pure function of numbers. `model_shape` reads only the model's
config and builds the model on the meta device, so a 70B model is counted in seconds without weights.

Formulas (printed with every estimate, so nobody has to guess which one was used):
- training FLOPs = 6 x N x D + 12 x n_layer x d_attn x seq_len x D  (N non-embedding parameters,
  D processed tokens; the second term is attention scores and their use, forward + backward,
  as in PaLM, Chowdhery et al. 2022, appendix B)
- wall clock = FLOPs / (devices x dense peak FLOP/s x utilisation)
- model states per device (ZeRO paper, Rajbhandari et al. 2019): mixed-precision Adam keeps 2 bytes of
  16-bit parameters + 2 bytes of 16-bit gradients + 12 bytes of fp32 master weights, momentum and
  variance per parameter; fp32 training 4 + 4 + 8, and 4 + 4 + 12 under ZeRO (DeepSpeed's ZeRO
  optimizers step on an fp32 copy of each partition also in fp32: counted by memory_census); 16-bit
  autocast without DeepSpeed (fp32 weights, gradients and Adam, and a 16-bit copy of each weight for the
  forward) 4 + 2 + 4 + 8. Stage 1 partitions the optimizer states over the data-parallel ranks, stage 2
  also the gradients, stage 3 also the parameters; offloaded parts leave the device. Next to the
  partitions, in the compute precision (zero_working_bytes): stage 3 gathers two layers or the embedding /
  LM head, whichever is larger, and holds one such unit's full gradient before reducing it; stages 1 and 2
  hold the largest tensor's full gradient outside their reduce bucket (and, offloading, a staging buffer
  of that size on the device and in host memory).
- FSDP2 per device: fp32 parameters (the masters, also under bf16: 4 bytes), gradients (4) and Adam
  states (8) per parameter, sharded over the shard group (every process; dp_shard_size when hybrid);
  plus parameters gathered in the compute precision (2 bytes in bf16/fp16, 4 in fp32) for two FSDP
  units at a time (the one computing and the next being gathered; a unit is a decoder layer or the
  embeddings), or for the whole model when layers are not resharded after forward, and their
  unsharded gradients: one unit's, or the whole model's while an accumulation window defers the
  reduce-scatter to its last micro-batch. Offload moves the sharded states to host memory.
- activations per device = n_layer x s x b x h x (34 + 5 x a x s / h) bytes for 16-bit activations,
  x2 for fp32 (Korthikanti et al. 2022, no recomputation). With activation checkpointing only each
  layer's input is kept (2 x s x b x h bytes, x2 in fp32) plus one layer's activations while it is
  recomputed. Logits: fp32 logits of every token and their gradient, 8 x s x b x V bytes; with the
  chunked loss only one chunk's, 8 x min(chunk, s x b) x V.
- preference tuning (Workload): each pair trains two sequences (chosen and rejected), so tokens and the
  micro-batch's sequences double; a reference model's forward (a third of forward + backward) runs over the
  same tokens every step, or once over the training pairs when precomputed; a frozen copy as the reference
  holds its parameters on every device (partitioned under ZeRO-3) next to the policy's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

FLOPS_FORMULA = "6 x non-embedding params x tokens + 12 x layers x attention dim x seq len x tokens"
REFERENCE_FLOPS = "; + a third of that (a forward) over the reference's tokens"
MEMORY_FORMULA = (
    "ZeRO accounting: bf16/fp16 2 (params) + 2 (grads) + 12 (fp32 Adam states) bytes/param, fp32 4 + 4 + 8 "
    "(+ 4 for the fp32 copy ZeRO optimizers step on), bf16/fp16 autocast without DeepSpeed 4 + 2 (16-bit copy "
    "of the weights) + 4 + 8; stage 1 splits optimizer states, 2 also grads, 3 also params over data-parallel "
    "ranks; + in the compute precision: ZeRO-3 2 gathered layers or the embedding, whichever is larger, and "
    "one such unit's gradient, ZeRO-1/2 the embedding's gradient (twice more with the optimizer offloaded); "
    "pipeline stages split them evenly; grads and optimizer states only for trainable params (LoRA)"
)
FSDP2_MEMORY_FORMULA = (
    "FSDP2 accounting: fp32 params 4 + grads 4 + Adam states 8 bytes/param sharded over the shard group; plus "
    "params gathered in the compute precision (2 bytes bf16/fp16, 4 fp32) for 2 units (a decoder layer or the "
    "embeddings), or the whole model without resharding after forward, and their unsharded grads (the whole "
    "model's while accumulation defers the reduce-scatter); offload: sharded states in host memory"
)
ACTIVATION_FORMULA = (
    "layers x s x b x h x (34 + 5 a s / h) bytes (x2 in fp32); checkpointed: layers x 2 s b h + one layer's; "
    "+ 8 x tokens x V for fp32 logits and their gradient (tokens = s b, or one chunk with the chunked loss)"
)
DEFAULT_UTILIZATION = 0.4  # model FLOPs utilisation of a well-tuned dense training job on GPUs

# bytes per parameter: (parameters, gradients, optimizer states) for Adam
STATE_BYTES = {"fp32": (4, 4, 8), "bf16": (2, 2, 12), "fp16": (2, 2, 12)}


@dataclass(frozen=True)
class ModelShape:
    total_params: int
    embedding_params: int  # token and position embeddings, plus the output head when it is not tied
    num_layers: int
    hidden_size: int
    num_heads: int
    attention_dim: int  # query heads x head dim
    vocab_size: int
    has_lm_head: bool = True  # False for encoders: no vocabulary-sized logits to keep

    @property
    def non_embedding_params(self) -> int:
        return self.total_params - self.embedding_params


def training_flops(shape: ModelShape, tokens: float, seq_len: float) -> float:
    """FLOPs of forward + backward over `tokens` processed tokens in sequences of `seq_len`."""
    return (
        6 * shape.non_embedding_params * tokens
        + 12 * shape.num_layers * shape.attention_dim * seq_len * tokens
    )


def wall_clock_seconds(flops: float, num_devices: int, peak_flops: float, utilization: float) -> float:
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    return flops / (num_devices * peak_flops * utilization)


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes per device (the `offloaded_*` parts live in host RAM or NVMe instead)."""

    parameters: float
    gradients: float
    optimizer_states: float
    activations: float
    offloaded: float
    reference: float = 0.0  # a frozen reference model's parameters (preference tuning)

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer_states + self.activations + self.reference

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def model_state_bytes(
    num_params: int,
    dp_size: int,
    zero_stage: int,
    precision: str,
    offload_optimizer: str | None = None,
    offload_param: str | None = None,
    trainable_params: int | None = None,
    autocast: bool = False,
) -> tuple[float, float, float, float]:
    """(parameters, gradients, optimizer states, offloaded) bytes per device for Adam under ZeRO (without
    the parameters ZeRO-3 gathers for computing, zero3_gathered_bytes).
    Gradients and optimizer states exist for trainable parameters only (all of them unless given).
    `autocast`: 16-bit precision by autocast (no DeepSpeed), where weights, gradients and Adam stay
    fp32 and each weight's 16-bit copy is cached for the forward and kept by autograd for backward."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    trainable = num_params if trainable_params is None else trainable_params
    param_b, grad_b, optim_b = STATE_BYTES[precision]
    if autocast and precision != "fp32":
        param_b, grad_b, optim_b = 4 + 2, 4, 8
    if precision == "fp32" and zero_stage >= 1:
        optim_b += 4  # DeepSpeed's ZeRO optimizers step on an fp32 copy of each partition, also in fp32
    params = param_b * num_params / (dp_size if zero_stage >= 3 else 1)
    grads = grad_b * trainable / (dp_size if zero_stage >= 2 else 1)
    optim = optim_b * trainable / (dp_size if zero_stage >= 1 else 1)
    offloaded = 0.0
    if offload_optimizer in ("cpu", "nvme"):
        offloaded, optim = offloaded + optim, 0.0
    if offload_param in ("cpu", "nvme") and zero_stage == 3:
        offloaded, params = offloaded + params, 0.0
    return params, grads, optim, offloaded


def zero3_gathered_bytes(shape: ModelShape, precision: str) -> float:
    """Parameters ZeRO-3 holds gathered at once, in the compute precision: two decoder layers (the ds_configs'
    stage3_max_live_parameters, which the recipe fills with two layers' worth), or the embedding / LM head
    when it is larger (it stays gathered across the turn from forward to backward)."""
    return _compute_bytes(precision) * largest_gathered_unit(shape, layers=2)


def largest_gathered_unit(shape: ModelShape, layers: int = 1) -> float:
    """Parameters of `layers` decoder layers, or of the token embedding (vocabulary x width) if larger."""
    layer = shape.non_embedding_params / max(shape.num_layers, 1)
    return max(layers * layer, shape.vocab_size * shape.hidden_size)


def zero_working_bytes(
    shape: ModelShape, zero_stage: int, precision: str, offload_optimizer: str | None = None
) -> tuple[float, float, float]:
    """(parameters, gradients, host memory) bytes ZeRO holds next to its partitions while it computes, in the
    compute precision, for full fine-tuning (counted with memory_census; README, DeepSpeed):
    - stage 3: the gathered parameters (zero3_gathered_bytes) and the full gradient of one layer, or of the
      embedding / LM head if larger, before its reduce-scatter;
    - stages 1 and 2: the full gradient of the largest tensor (the embedding or LM head, vocabulary x width),
      which is larger than the reduce bucket and waits outside it; with the optimizer offloaded, a staging
      buffer of that size on the device and one in host memory."""
    compute = _compute_bytes(precision)
    if zero_stage == 3:
        return zero3_gathered_bytes(shape, precision), compute * largest_gathered_unit(shape), 0.0
    if zero_stage in (1, 2):
        largest = compute * shape.vocab_size * shape.hidden_size
        offloaded = offload_optimizer in ("cpu", "nvme")
        return 0.0, largest * (2 if offloaded else 1), largest if offloaded else 0.0
    return 0.0, 0.0, 0.0


def _compute_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


@dataclass(frozen=True)
class FSDP2Layout:
    """How FSDP2 holds the model: sharded over `shard_size` processes (the rest of the world size holds
    replicas under hybrid sharding), in host memory with `offload`, each layer gathered again for its
    backward with `reshard_after_forward`."""

    shard_size: int
    offload: bool = False
    reshard_after_forward: bool = True

    def describe(self, world_size: int) -> str:
        replicas = world_size // self.shard_size
        hybrid = f", {replicas} replicas (hybrid)" if replicas > 1 else ""
        return f"FSDP2 sharded over {self.shard_size}{hybrid}" + (", offloaded" if self.offload else "")


def fsdp2_state_bytes(
    shape: ModelShape,
    layout: FSDP2Layout,
    precision: str,
    trainable_params: int | None = None,
    accumulating: bool = False,
) -> tuple[float, float, float, float]:
    """(parameters, gradients, optimizer states, offloaded) bytes per device under FSDP2 (module docstring);
    `accumulating`: gradient accumulation over more than one micro-batch per optimizer step."""
    total = shape.total_params
    trainable = total if trainable_params is None else trainable_params
    compute = _compute_bytes(precision)
    params, grads, optim = (
        b * n / layout.shard_size for b, n in ((4, total), (4, trainable), (8, trainable))
    )
    offloaded = 0.0
    if layout.offload:
        offloaded, params, grads, optim = params + grads + optim, 0.0, 0.0, 0.0
    unit = largest_gathered_unit(shape)  # an FSDP unit: a decoder layer or the embeddings
    gathered = compute * (2 * unit if layout.reshard_after_forward else total)
    unsharded_grads = compute * (trainable if accumulating else trainable * unit / total)
    return params + gathered, grads + unsharded_grads, optim, offloaded


@dataclass(frozen=True)
class Workload:
    """What a training sample costs beyond one sequence trained on (see the module docstring)."""

    sequences_per_sample: int = 1
    reference: str | None = None  # None | "copy" | "adapter" (forward every step) | "precomputed" (once)


@dataclass(frozen=True)
class Levers:
    """The memory levers of a run that change its activations (precision is passed on its own)."""

    gradient_checkpointing: bool = False
    loss_chunk_tokens: int = 0  # 0: logits of every token at once

    def describe(self) -> str:
        on = []
        if self.gradient_checkpointing:
            on.append("activation checkpointing")
        if self.loss_chunk_tokens:
            on.append(f"chunked loss ({self.loss_chunk_tokens} tokens)")
        return ", ".join(on) or "none"


def activation_bytes(
    shape: ModelShape, micro_batch_size: int, seq_len: float, precision: str, levers: Levers = Levers()
) -> float:
    s, b, h, a = seq_len, micro_batch_size, shape.hidden_size, shape.num_heads
    width = 2 if precision == "fp32" else 1  # fp32 activations take twice the 16-bit bytes
    per_layer = s * b * h * (34 + 5 * a * s / h) * width
    if levers.gradient_checkpointing:  # the layers' inputs, and one layer at a time recomputed
        layers = shape.num_layers * 2 * s * b * h * width + per_layer
    else:
        layers = shape.num_layers * per_layer
    tokens = min(levers.loss_chunk_tokens, s * b) if levers.loss_chunk_tokens else s * b
    logits = 8 * tokens * shape.vocab_size if shape.has_lm_head else 0
    return layers + logits


def device_memory(
    shape: ModelShape,
    dp_size: int,
    zero_stage: int,
    precision: str,
    micro_batch_size: int,
    seq_len: float,
    offload_optimizer: str | None = None,
    offload_param: str | None = None,
    pipeline_stages: int = 1,
    trainable_params: int | None = None,
    levers: Levers = Levers(),
    fsdp: FSDP2Layout | None = None,
    accumulating: bool = False,
    autocast: bool = False,
    reference_copy: bool = False,
) -> DeviceMemory:
    """Activations are not divided by pipeline stages: under 1F1B a stage holds up to one micro-batch
    per stage in flight, which is about one micro-batch through all layers. `trainable_params` (e.g.
    LoRA adapters only) limits gradients and optimizer states; activations are counted in full. With
    `fsdp`, model states as FSDP2 holds them (`accumulating`: more than one micro-batch per step);
    `autocast`: 16-bit precision by autocast, not DeepSpeed's (model_state_bytes).
    `reference_copy`: a frozen copy of the model, held as the parameters are."""
    if fsdp is not None:
        params, grads, optim, offloaded = fsdp2_state_bytes(
            shape, fsdp, precision, trainable_params, accumulating
        )
    else:
        params, grads, optim, offloaded = model_state_bytes(
            shape.total_params // pipeline_stages,
            dp_size,
            zero_stage,
            precision,
            offload_optimizer,
            offload_param,
            None if trainable_params is None else trainable_params // pipeline_stages,
            autocast,
        )
        full_fine_tuning = trainable_params is None or trainable_params == shape.total_params
        if pipeline_stages == 1 and (zero_stage == 3 or full_fine_tuning):
            working = zero_working_bytes(shape, zero_stage, precision, offload_optimizer)
            if not full_fine_tuning:  # LoRA: only the gathered parameters; adapter gradients are small
                working = (working[0], 0.0, 0.0)
            params, grads, offloaded = params + working[0], grads + working[1], offloaded + working[2]
    activations = activation_bytes(shape, micro_batch_size, seq_len, precision, levers)
    reference = 0.0
    if reference_copy:
        weight_bytes = 4 if autocast else STATE_BYTES[precision][0]  # autocast keeps fp32 weights
        held = weight_bytes * shape.total_params / (dp_size if zero_stage >= 3 else 1)
        if offload_param in ("cpu", "nvme") and zero_stage == 3:
            offloaded += held
        else:
            reference = held
    return DeviceMemory(params, grads, optim, activations, offloaded, reference)


def fit_warning(
    memory: DeviceMemory, device_name: str, device_bytes: float, zero_stage: int, fsdp: bool = False
) -> str | None:
    """None when the estimate fits on the device, else what to change."""
    if memory.total <= device_bytes:
        return None
    hint = f"a higher ZeRO stage (now {zero_stage})" if zero_stage < 3 else "offloading to CPU"
    if fsdp:
        hint = "offloading to CPU (fsdp2_offload.yaml)"
    return (
        f"does not fit: needs {memory.total / 1e9:.1f} GB per device, a {device_name} has "
        f"{device_bytes / 1e9:.0f} GB; use {hint}, more data-parallel devices, a smaller "
        "per_device_train_batch_size or max_seq_length, or gradient checkpointing"
    )


def estimate_run(
    plan: dict,
    shape: ModelShape,
    precision: str,
    seq_len: float,
    *,
    zero_stage: int = 0,
    offload_optimizer: str | None = None,
    offload_param: str | None = None,
    device=None,
    utilization: float = DEFAULT_UTILIZATION,
    levers: Levers = Levers(),
    fsdp: FSDP2Layout | None = None,
    autocast: bool = False,
    workload: Workload = Workload(),
) -> dict:
    """Tokens, FLOPs, wall clock (with a `hardware.Device`) and per-device memory of a plan, under ZeRO
    (stage 0: DDP) or, with `fsdp`, FSDP2."""
    sequences = workload.sequences_per_sample
    tokens = plan["samples_per_step"] * plan["total_optimizer_steps"] * seq_len * sequences
    reference_tokens = {
        "copy": tokens,
        "adapter": tokens,
        "precomputed": plan["num_samples"] * sequences * seq_len,
    }.get(workload.reference, 0)
    # A forward is a third of forward + backward.
    flops = training_flops(shape, tokens, seq_len) + training_flops(shape, reference_tokens, seq_len) / 3
    memory = device_memory(
        shape,
        plan["data_parallel_size"],
        zero_stage,
        precision,
        plan["micro_batch_size"] * sequences,
        seq_len,
        offload_optimizer,
        offload_param,
        plan.get("pipeline_stages", 1),
        plan.get("trainable_parameters"),
        levers,
        fsdp,
        plan["gradient_accumulation_steps"] > 1,
        autocast,
        reference_copy=workload.reference == "copy",
    )
    sharding = fsdp.describe(plan["world_size"]) if fsdp else f"ZeRO-{zero_stage}"
    out = {
        "model_params": shape.total_params,
        "non_embedding_params": shape.non_embedding_params,
        "precision": precision,
        "seq_len": seq_len,
        "trained_target_tokens": plan.get("approx_total_tokens"),
        "processed_tokens": tokens,
        "reference_forward_tokens": reference_tokens,
        "training_flops": flops,
        "flops_formula": FLOPS_FORMULA + (REFERENCE_FLOPS if reference_tokens else ""),
        "zero_stage": zero_stage,
        "sharding": sharding,
        "offload_optimizer": offload_optimizer,
        "offload_param": offload_param,
        "memory_levers": levers.describe(),
        "memory_per_device": memory.to_dict(),
        "memory_formula": FSDP2_MEMORY_FORMULA if fsdp else MEMORY_FORMULA,
        "activation_formula": ACTIVATION_FORMULA,
    }
    if device is not None:
        peak = device.peak_flops.get(precision)
        if peak is None:
            raise ValueError(
                f"{device.name} has no {precision} peak in the accelerator table; choose another --gpu"
            )
        seconds = wall_clock_seconds(flops, plan["world_size"], peak, utilization)
        fits = memory.total <= device.memory_bytes
        out.update(
            {
                "gpu": device.name,
                "peak_flops_per_device": peak,
                "utilization": utilization,
                "wall_clock_seconds": seconds,
                "wall_clock": format_seconds(seconds),
                "device_memory": None if device.memory_bytes == float("inf") else device.memory_bytes,
                "fits": fits,
                "warning": fit_warning(
                    memory, device.name, device.memory_bytes, zero_stage, fsdp is not None
                ),
            }
        )
    return out


def format_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def estimate_table(est: dict) -> str:
    """The estimate as aligned `name  value` rows, each number with the assumption behind it."""
    mem = est["memory_per_device"]
    rows = [
        ("model parameters", f"{est['model_params']:,} ({est['non_embedding_params']:,} non-embedding)"),
        ("precision", est["precision"]),
        ("trained target tokens", _num(est["trained_target_tokens"])),
        (
            "processed tokens",
            f"{_num(est['processed_tokens'])} (sequences of {est['seq_len']:g} tokens: "
            f"{est.get('seq_len_source', 'given')})",
        ),
        ("training FLOPs", f"{est['training_flops']:.3e} = {est['flops_formula']}"),
    ]
    if est.get("reference_forward_tokens"):
        rows.insert(-1, ("reference forward tokens", _num(est["reference_forward_tokens"])))
    if "wall_clock_seconds" in est:
        rows.append(
            (
                "wall clock",
                f"{est['wall_clock']} at {est['utilization']:.0%} of {est['peak_flops_per_device'] / 1e12:g} TFLOP/s "
                f"dense {est['precision']} peak per {est['gpu']} (--utilization to change)",
            )
        )
    if "calibrated_wall_clock_seconds" in est:
        rows.append(
            (
                "calibrated wall clock",
                f"{format_seconds(est['calibrated_wall_clock_seconds'])} of step time ({est['seconds_per_step']:.3f} s "
                f"per step measured over {est['calibration_steps']} steps after a warm-up step)",
            )
        )
    offload = ", ".join(
        f"{k} offloaded to {est[f'offload_{k}']}" for k in ("optimizer", "param") if est[f"offload_{k}"]
    )
    if est["sharding"].endswith("offloaded"):
        offload = "FSDP2 parameters, gradients and optimizer states offloaded"
    rows += [
        (
            f"memory per device ({est['sharding']})",
            f"params {_gb(mem['parameters'])} + grads {_gb(mem['gradients'])} + optimizer "
            f"{_gb(mem['optimizer_states'])} + activations {_gb(mem['activations'])}"
            + (f" + reference model {_gb(mem['reference'])}" if mem.get("reference") else "")
            + f" = {_gb(mem['total'])}"
            + (f"; {offload}: {_gb(mem['offloaded'])} in host memory" if offload else ""),
        ),
        ("memory levers", est["memory_levers"]),
        ("memory formula", est["memory_formula"]),
        ("activation formula", est["activation_formula"]),
    ]
    if "fits" in est:
        capacity = (
            f" of {_gb(est['device_memory'])}" if est["device_memory"] else " (host memory, not checked)"
        )
        rows.append(
            ("fits", f"yes: {_gb(mem['total'])}{capacity}" if est["fits"] else f"WARNING: {est['warning']}")
        )
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _gb(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"
