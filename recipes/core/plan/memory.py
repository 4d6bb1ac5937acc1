"""Memory per device of a training step: model states (model_states.py), activations (activations.py) and a
frozen reference model's parameters (workload.py), and whether they fit on a device."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from recipes.core.plan.activations import Levers, activation_bytes
from recipes.core.plan.model_shape import ModelShape
from recipes.core.plan.model_states import (
    STATE_BYTES,
    FSDP2Layout,
    Quantization,
    Storage,
    ZeroLayout,
    fsdp2_state_bytes,
    model_state_bytes,
    zero_working_bytes,
)
from recipes.core.plan.workload import MicroBatch, Workload


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


def device_memory(
    shape: ModelShape,
    batch: MicroBatch,
    precision: str,
    zero: ZeroLayout = ZeroLayout(),
    fsdp: FSDP2Layout | None = None,
    *,
    autocast: bool = False,
    levers: Levers = Levers(),
    workload: Workload = Workload(),
    trainable_params: int | None = None,
    quantization: Quantization | None = None,
    eight_bit_states: bool = False,
) -> DeviceMemory:
    """Model states as `zero` lays them out (stage 0: DDP), or with `fsdp` as FSDP2 holds them;
    `trainable_params` (e.g. LoRA adapters only) limits gradients and optimizer states, and `autocast`
    means 16-bit precision by autocast, not DeepSpeed's (model_state_bytes). Activations are counted in
    full and not divided by pipeline stages: under 1F1B a stage holds up to one micro-batch per stage in
    flight, which is about one micro-batch through all layers. A frozen copy of the model as the workload's
    reference is held as the parameters are. With `quantization` the decoder layers' weights are held
    quantised (every non-embedding parameter counted so: the norms' few are noise) and one layer at a time
    dequantised in the compute precision; `eight_bit_states`: bitsandbytes' 8-bit Adam states."""
    storage = Storage(quantization, shape.non_embedding_params, shape.hidden_size, eight_bit_states)
    if fsdp is not None:
        params, grads, optim, offloaded = fsdp2_state_bytes(
            shape, fsdp, precision, trainable_params, batch.accumulating, storage
        )
    else:
        params, grads, optim, offloaded = model_state_bytes(
            shape.total_params, zero, precision, trainable_params, autocast, storage
        )
        full_fine_tuning = trainable_params is None or trainable_params == shape.total_params
        if zero.pipeline_stages == 1 and (zero.stage == 3 or full_fine_tuning):
            working = zero_working_bytes(shape, zero, precision)
            if not full_fine_tuning:  # LoRA: only the gathered parameters; adapter gradients are small
                working = (working[0], 0.0, 0.0)
            params, grads, offloaded = params + working[0], grads + working[1], offloaded + working[2]
    if quantization is not None:  # one layer's weights dequantised for its products
        compute = 4 if precision == "fp32" else 2
        params += compute * shape.non_embedding_params / max(shape.num_layers, 1)
    sequences = batch.size * workload.sequences_per_sample
    activations = activation_bytes(shape, sequences, batch.seq_len, precision, levers)
    reference = 0.0
    if workload.reference == "copy":
        weight_bytes = 4 if autocast else STATE_BYTES[precision][0]  # autocast keeps fp32 weights
        # loaded as the policy is, quantised too
        held = storage.weight_bytes(shape.total_params, weight_bytes)
        held /= zero.data_parallel_size if zero.stage >= 3 else 1
        if zero.offload_param in ("cpu", "nvme") and zero.stage == 3:
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
