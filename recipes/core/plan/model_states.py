"""Model states per device (parameters, gradients, optimizer states) as ZeRO or FSDP2 hold them.

- ZeRO (Rajbhandari et al. 2019): mixed-precision Adam keeps 2 bytes of 16-bit parameters + 2 bytes of
  16-bit gradients + 12 bytes of fp32 master weights, momentum and variance per parameter; fp32 training
  4 + 4 + 8, and 4 + 4 + 12 under ZeRO (DeepSpeed's ZeRO optimizers step on an fp32 copy of each
  partition also in fp32: counted by memory_census); 16-bit autocast without DeepSpeed (fp32 weights,
  gradients and Adam, and a 16-bit copy of each weight for the forward) 4 + 2 + 4 + 8. Stage 1 partitions
  the optimizer states over the data-parallel ranks, stage 2 also the gradients, stage 3 also the
  parameters; offloaded parts leave the device. Next to the partitions, in the compute precision
  (zero_working_bytes): stage 3 gathers two layers or the embedding / LM head, whichever is larger, and
  holds one such unit's full gradient before reducing it; stages 1 and 2 hold the largest tensor's full
  gradient outside their reduce bucket (and, offloading, a staging buffer of that size on the device and
  in host memory).
- FSDP2: fp32 parameters (the masters, also under bf16: 4 bytes), gradients (4) and Adam states (8) per
  parameter, sharded over the shard group (every process; dp_shard_size when hybrid); plus parameters
  gathered in the compute precision (2 bytes in bf16/fp16, 4 in fp32) for two FSDP units at a time (the
  one computing and the next being gathered; a unit is a decoder layer or the embeddings), or for the
  whole model when layers are not resharded after forward, and their unsharded gradients: one unit's, or
  the whole model's while an accumulation window defers the reduce-scatter to its last micro-batch.
  Offload moves the sharded states to host memory.
- A quantised base (QLoRA, bitsandbytes): the linear weights of the decoder layers take `Quantization`'s
  bytes per weight instead of 4 (the embeddings, norms and LM head stay fp32), frozen; each product
  dequantises one weight matrix into the compute dtype, at most one decoder layer's worth at a time.
- 8-bit optimizer states (bitsandbytes' AdamW8bit): momentum and variance one byte each per trained
  parameter plus an fp32 scale per block of 256 values each, instead of 4 + 4.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from recipes.core.plan.model_shape import ModelShape

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

QUANTIZED_FORMULA = (
    "; quantised base: decoder-layer linear weights 0.5 byte + a 4-byte scale per block of 64 (4-bit; "
    "double quantisation: a 1-byte scale per 64 and 4 bytes per 256 blocks) or 1 byte + a 4-byte scale per "
    "row (8-bit), frozen, the rest fp32, + one decoder layer dequantised in the compute precision"
)
EIGHT_BIT_FORMULA = "; 8-bit Adam states: 1 + 1 byte/trained param + 4 bytes per 256 values of each"
# bytes per parameter: (parameters, gradients, optimizer states) for Adam
STATE_BYTES = {"fp32": (4, 4, 8), "bf16": (2, 2, 12), "fp16": (2, 2, 12)}
ADAM_STATE_BYTES = 8  # fp32 momentum and variance
EIGHT_BIT_ADAM_STATE_BYTES = 2 * (1 + 4 / 256)  # each state: a byte per value, an fp32 scale per 256
BLOCK_4BIT, BLOCKS_PER_SCALE = 64, 256  # bitsandbytes' 4-bit block; double quantisation's second level


@dataclass(frozen=True)
class Quantization:
    """The decoder layers' linear weights stored by bitsandbytes: `bits` 4 (two values a byte, an fp32
    scale per block of 64, or with `double_quant` an 8-bit scale per block and an fp32 one per 256 blocks)
    or 8 (a byte a value, an fp32 scale per output row)."""

    bits: int = 4
    double_quant: bool = False

    @classmethod
    def of_config(cls, fields: Mapping[str, Any]) -> Quantization | None:
        """From a recipe config's fields (load_in_4bit, load_in_8bit, bnb_4bit_use_double_quant)."""
        if fields.get("load_in_4bit"):
            return cls(4, bool(fields.get("bnb_4bit_use_double_quant")))
        return cls(8) if fields.get("load_in_8bit") else None

    def bytes_per_weight(self, row_length: int) -> float:
        if self.bits == 8:
            return 1 + 4 / row_length
        scale = (1 + 4 / BLOCKS_PER_SCALE) / BLOCK_4BIT if self.double_quant else 4 / BLOCK_4BIT
        return 0.5 + scale

    def describe(self) -> str:
        return (
            "8-bit" if self.bits == 8 else "4-bit" + (" (double quantisation)" if self.double_quant else "")
        )


@dataclass(frozen=True)
class Storage:
    """How the weights and Adam states are stored beyond the precision: a quantised base's `quantization`
    (its `quantized_params` held that way) and 8-bit optimizer states."""

    quantization: Quantization | None = None
    quantized_params: int = 0
    row_length: int = 1  # an 8-bit weight's row, the hidden size
    eight_bit_states: bool = False

    def weight_bytes(self, params: float, fp32_bytes: float) -> float:
        """Bytes of `params` parameters, of which the quantised share takes its bytes per weight and the
        rest `fp32_bytes` each."""
        if self.quantization is None:
            return fp32_bytes * params
        quantized = min(self.quantized_params, params)
        return (
            fp32_bytes * (params - quantized)
            + self.quantization.bytes_per_weight(self.row_length) * quantized
        )


@dataclass(frozen=True)
class ZeroLayout:
    """How the model is held without FSDP: split into `pipeline_stages` stages (DeepSpeed's pipeline
    engine), each on `data_parallel_size` ranks that ZeRO `stage` 1 partitions the optimizer states over,
    2 also the gradients, 3 also the parameters (0: every rank holds them all, as DDP does);
    `offload_optimizer` and `offload_param` ("cpu" or "nvme") move those partitions off the device."""

    stage: int = 0
    data_parallel_size: int = 1
    pipeline_stages: int = 1
    offload_optimizer: str | None = None
    offload_param: str | None = None

    def describe(self) -> str:
        return f"ZeRO-{self.stage}"


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


def model_state_bytes(
    num_params: int,
    zero: ZeroLayout,
    precision: str,
    trainable_params: int | None = None,
    autocast: bool = False,
    storage: Storage = Storage(),
) -> tuple[float, float, float, float]:
    """(parameters, gradients, optimizer states, offloaded) bytes per device for Adam under ZeRO (without
    the parameters ZeRO-3 gathers for computing, zero3_gathered_bytes); each pipeline stage holds an even
    share of the `num_params` parameters. Gradients and optimizer states exist for trainable parameters
    only (all of them unless given). `autocast`: 16-bit precision by autocast (no DeepSpeed), where
    weights, gradients and Adam stay fp32 and each weight's 16-bit copy is cached for the forward and kept
    by autograd for backward. `storage`: a quantised base's frozen weights and 8-bit Adam states."""
    if zero.stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero.stage}")
    held = num_params // zero.pipeline_stages
    trainable = held if trainable_params is None else trainable_params // zero.pipeline_stages
    param_b, grad_b, optim_b = STATE_BYTES[precision]
    if autocast and precision != "fp32":
        param_b, grad_b, optim_b = 4 + 2, 4, 8
    if precision == "fp32" and zero.stage >= 1:
        optim_b += 4  # DeepSpeed's ZeRO optimizers step on an fp32 copy of each partition, also in fp32
    if storage.eight_bit_states:
        optim_b += EIGHT_BIT_ADAM_STATE_BYTES - ADAM_STATE_BYTES
    dp_size = zero.data_parallel_size
    params = storage.weight_bytes(held, param_b) / (dp_size if zero.stage >= 3 else 1)
    grads = grad_b * trainable / (dp_size if zero.stage >= 2 else 1)
    optim = optim_b * trainable / (dp_size if zero.stage >= 1 else 1)
    offloaded = 0.0
    if zero.offload_optimizer in ("cpu", "nvme"):
        offloaded, optim = offloaded + optim, 0.0
    if zero.offload_param in ("cpu", "nvme") and zero.stage == 3:
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


def zero_working_bytes(shape: ModelShape, zero: ZeroLayout, precision: str) -> tuple[float, float, float]:
    """(parameters, gradients, host memory) bytes ZeRO holds next to its partitions while it computes, in the
    compute precision, for full fine-tuning (counted with memory_census; README, DeepSpeed):
    - stage 3: the gathered parameters (zero3_gathered_bytes) and the full gradient of one layer, or of the
      embedding / LM head if larger, before its reduce-scatter;
    - stages 1 and 2: the full gradient of the largest tensor (the embedding or LM head, vocabulary x width),
      which is larger than the reduce bucket and waits outside it; with the optimizer offloaded, a staging
      buffer of that size on the device and one in host memory."""
    compute = _compute_bytes(precision)
    if zero.stage == 3:
        return zero3_gathered_bytes(shape, precision), compute * largest_gathered_unit(shape), 0.0
    if zero.stage in (1, 2):
        largest = compute * shape.vocab_size * shape.hidden_size
        offloaded = zero.offload_optimizer in ("cpu", "nvme")
        return 0.0, largest * (2 if offloaded else 1), largest if offloaded else 0.0
    return 0.0, 0.0, 0.0


def _compute_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def fsdp2_state_bytes(
    shape: ModelShape,
    layout: FSDP2Layout,
    precision: str,
    trainable_params: int | None = None,
    accumulating: bool = False,
    storage: Storage = Storage(),
) -> tuple[float, float, float, float]:
    """(parameters, gradients, optimizer states, offloaded) bytes per device under FSDP2 (module docstring);
    `accumulating`: gradient accumulation over more than one micro-batch per optimizer step; `storage`: a
    quantised base's frozen weights, sharded and gathered as they are stored."""
    total = shape.total_params
    trainable = total if trainable_params is None else trainable_params
    compute = _compute_bytes(precision)
    params = storage.weight_bytes(total, 4) / layout.shard_size
    grads, optim = (b * trainable / layout.shard_size for b in (4, ADAM_STATE_BYTES))
    offloaded = 0.0
    if layout.offload:
        offloaded, params, grads, optim = params + grads + optim, 0.0, 0.0, 0.0
    unit = largest_gathered_unit(shape)  # an FSDP unit: a decoder layer or the embeddings
    gathered = compute * (2 * unit if layout.reshard_after_forward else total)
    if storage.quantization is not None:  # gathered as stored; each product dequantises its own weight
        gathered = storage.weight_bytes(total, compute) * (
            2 * unit / total if layout.reshard_after_forward else 1
        )
    unsharded_grads = compute * (trainable if accumulating else trainable * unit / total)
    return params + gathered, grads + unsharded_grads, optim, offloaded
