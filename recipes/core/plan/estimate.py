"""The estimate `recipes plan` prints: tokens, FLOPs (flops.py), wall clock (wall_clock.py) and memory per
device (memory.py) of a plan, each number in the table with the formula behind it; for GRPO also how a
step splits between sampling and training (rollout_cost.py)."""

from __future__ import annotations

from recipes.core.plan.activations import ACTIVATION_FORMULA, Levers
from recipes.core.plan.flops import FLOPS_FORMULA, REFERENCE_FLOPS, training_flops
from recipes.core.plan.memory import device_memory, fit_warning
from recipes.core.plan.model_shape import ModelShape
from recipes.core.plan.model_states import (
    EIGHT_BIT_FORMULA,
    FSDP2_MEMORY_FORMULA,
    MEMORY_FORMULA,
    QUANTIZED_FORMULA,
    FSDP2Layout,
    Quantization,
    Storage,
    ZeroLayout,
)
from recipes.core.plan.rollout_cost import (
    ROLLOUT_FORMULA,
    RolloutShape,
    decode_bytes_per_token,
    generation_memory_bytes,
    rollout_flops,
    rollout_seconds,
)
from recipes.core.plan.wall_clock import DEFAULT_UTILIZATION, format_seconds, wall_clock_seconds
from recipes.core.plan.workload import MicroBatch, Workload


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
    quantization: Quantization | None = None,
    eight_bit_states: bool = False,
) -> dict:
    """Tokens, FLOPs, wall clock (with a `hardware.Device`) and per-device memory of a plan, under ZeRO
    (stage 0: DDP) or, with `fsdp`, FSDP2; a quantised base and 8-bit optimizer states as memory_formula
    says."""
    sequences = workload.sequences_per_sample
    tokens = plan["samples_per_step"] * plan["total_optimizer_steps"] * seq_len * sequences
    reference_tokens = {
        "copy": tokens,
        "adapter": tokens,
        "precomputed": plan["num_samples"] * sequences * seq_len,
    }.get(workload.reference, 0)
    # A forward is a third of forward + backward.
    flops = training_flops(shape, tokens, seq_len) + training_flops(shape, reference_tokens, seq_len) / 3
    zero = ZeroLayout(
        stage=zero_stage,
        data_parallel_size=plan["data_parallel_size"],
        pipeline_stages=plan.get("pipeline_stages", 1),
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
    )
    memory = device_memory(
        shape,
        MicroBatch(plan["micro_batch_size"], seq_len, plan["gradient_accumulation_steps"] > 1),
        precision,
        zero,
        fsdp,
        autocast=autocast,
        levers=levers,
        workload=workload,
        trainable_params=plan.get("trainable_parameters"),
        quantization=quantization,
        eight_bit_states=eight_bit_states,
    )
    formula = _memory_formula(fsdp, quantization, eight_bit_states)
    sharding = fsdp.describe(plan["world_size"]) if fsdp else zero.describe()
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
        "quantization": quantization.describe() if quantization else None,
        "optimizer_states": "8-bit" if eight_bit_states else "fp32",
        "memory_formula": formula,
        "activation_formula": ACTIVATION_FORMULA,
    }
    if device is not None:
        peak = _peak_flops(device, precision)
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


def estimate_grpo_run(
    plan: dict,
    shape: ModelShape,
    precision: str,
    prompt_len: float,
    completion_len: float,
    *,
    old_logps: bool,
    reference: str | None = None,
    zero_stage: int = 0,
    offload_optimizer: str | None = None,
    offload_param: str | None = None,
    device=None,
    utilization: float = DEFAULT_UTILIZATION,
    levers: Levers = Levers(),
    fsdp: FSDP2Layout | None = None,
    autocast: bool = False,
    quantization: Quantization | None = None,
    eight_bit_states: bool = False,
) -> dict:
    """A GRPO plan's tokens, FLOPs and memory per device, and with a `hardware.Device` the seconds of
    sampling, logp passes and training (rollout_cost.py). `reference`: None, "copy" (a frozen model held
    next to the policy) or "adapter"."""
    run = RolloutShape(
        data_parallel_size=plan["data_parallel_size"],
        completions_per_generation_batch=plan["completions_per_generation_batch"],
        completions_per_step=plan["completions_per_step"],
        optimizer_steps_per_generation_batch=plan["optimizer_steps_per_generation_batch"],
        generation_batches=plan["generation_batches"],
        total_optimizer_steps=plan["total_optimizer_steps"],
        prompt_len=prompt_len,
        completion_len=completion_len,
        old_logps=old_logps,
        reference=reference is not None,
    )
    flops = rollout_flops(run, shape)
    zero = ZeroLayout(zero_stage, plan["data_parallel_size"], 1, offload_optimizer, offload_param)
    seq_len = prompt_len + completion_len
    memory = device_memory(
        shape,
        MicroBatch(plan["micro_batch_size"], seq_len, plan["gradient_accumulation_steps"] > 1),
        precision,
        zero,
        fsdp,
        autocast=autocast,
        levers=levers,
        workload=Workload(1, reference),
        trainable_params=plan.get("trainable_parameters"),
        quantization=quantization,
        eight_bit_states=eight_bit_states,
    )
    # The cache in the compute precision; the weights sampling reads too, except under autocast (fp32
    # weights cast at each product).
    kv = 4 if precision == "fp32" else 2
    held = 4 if autocast else kv
    storage = Storage(quantization, shape.non_embedding_params, shape.hidden_size)
    weights = storage.weight_bytes(shape.non_embedding_params, held)
    sharded = zero_stage == 3 or (fsdp is not None and fsdp.shard_size > 1)
    gathered = storage.weight_bytes(shape.total_params, held) if sharded else 0.0
    sampling_memory = generation_memory_bytes(run, shape, kv, gathered)
    generation_batches = plan["generation_batches"]
    out = {
        "model_params": shape.total_params,
        "non_embedding_params": shape.non_embedding_params,
        "precision": precision,
        "prompt_len": prompt_len,
        "completion_len": completion_len,
        "generated_tokens_per_step": plan["completions_per_generation_batch"]
        * completion_len
        / plan["optimizer_steps_per_generation_batch"],
        "trained_tokens_per_step": plan["completions_per_step"] * seq_len,
        "flops_per_generation_batch": {k: flops[k] for k in ("prefill", "decode", "logp_passes")},
        "training_flops_per_step": flops["training_per_step"],
        "total_flops": generation_batches * (flops["prefill"] + flops["decode"] + flops["logp_passes"])
        + plan["total_optimizer_steps"] * flops["training_per_step"],
        "flops_formula": FLOPS_FORMULA,
        "rollout_formula": ROLLOUT_FORMULA,
        "zero_stage": zero_stage,
        "sharding": fsdp.describe(plan["world_size"]) if fsdp else zero.describe(),
        "memory_levers": levers.describe(),
        "memory_per_device": memory.to_dict(),
        "sampling_memory": sampling_memory,
        "weights_gathered": sharded,
        "quantization": quantization.describe() if quantization else None,
        "optimizer_states": "8-bit" if eight_bit_states else "fp32",
        "memory_formula": _memory_formula(fsdp, quantization, eight_bit_states),
        "activation_formula": ACTIVATION_FORMULA,
    }
    if device is not None:
        peak = _peak_flops(device, precision)
        decode_bytes = decode_bytes_per_token(run, shape, weights, held, kv)
        seconds = rollout_seconds(run, flops, decode_bytes, peak, device.memory_bandwidth, utilization)
        # Sampling holds the states (not the gradients' activations) plus its cache and gathered weights.
        states = memory.total - memory.activations
        peak_memory = max(memory.total, states + sampling_memory)
        out.update(
            {
                "gpu": device.name,
                "peak_flops_per_device": peak,
                "memory_bandwidth": device.memory_bandwidth,
                "utilization": utilization,
                "decode_bytes_per_token": decode_bytes,
                "seconds": seconds,
                "wall_clock_seconds": seconds["run"],
                "wall_clock": None if seconds["run"] is None else format_seconds(seconds["run"]),
                "device_memory": None if device.memory_bytes == float("inf") else device.memory_bytes,
                "peak_memory": peak_memory,
                "fits": peak_memory <= device.memory_bytes,
            }
        )
    return out


def grpo_estimate_table(est: dict) -> str:
    """The GRPO estimate as aligned `name  value` rows."""
    mem, flops = est["memory_per_device"], est["flops_per_generation_batch"]
    rows = [
        ("model parameters", f"{est['model_params']:,} ({est['non_embedding_params']:,} non-embedding)"),
        ("precision", est["precision"]),
        (
            "tokens per sequence",
            f"prompt {est['prompt_len']:.1f} ({est.get('prompt_len_source', 'given')}) + completion "
            f"{est['completion_len']:g} ({est.get('completion_len_source', 'given')})",
        ),
        ("generated tokens per step", _num(est["generated_tokens_per_step"])),
        ("trained tokens per step", _num(est["trained_tokens_per_step"])),
        (
            "FLOPs per generation batch",
            f"prefill {flops['prefill']:.3e} + decode {flops['decode']:.3e} + logp passes "
            f"{flops['logp_passes']:.3e}",
        ),
        ("training FLOPs per step", f"{est['training_flops_per_step']:.3e} = {est['flops_formula']}"),
        ("run FLOPs", f"{est['total_flops']:.3e}"),
    ]
    if "seconds" in est:
        sec, bandwidth = est["seconds"], est["memory_bandwidth"]
        rate = (
            f"{est['utilization']:.0%} of {est['peak_flops_per_device'] / 1e12:g} TFLOP/s "
            f"{est['precision']} per {est['gpu']}"
        )
        if sec["sampling_per_generation_batch"] is None:
            rows.append(
                ("sampling", f"- ({est['gpu']} has no memory bandwidth in the table; use --calibrate)")
            )
        else:
            rows += [
                (
                    "sampling per generation batch",
                    f"{sec['sampling_per_generation_batch']:.3g} s, at least: {_gb(est['decode_bytes_per_token'])} "
                    f"read per token at {bandwidth / 1e9:g} GB/s, or FLOPs at {rate}",
                ),
                (
                    "logp passes per generation batch",
                    f"{sec['logp_passes_per_generation_batch']:.3g} s at {rate}",
                ),
                (
                    "step time split",
                    f"generation {sec['generation_per_step']:.3g} s + training {sec['training_per_step']:.3g} s "
                    f"per optimizer step: {sec['generation_share']:.0%} generation",
                ),
                ("wall clock", f"{est['wall_clock']} (--calibrate measures this machine)"),
            ]
    if "calibrated_wall_clock_seconds" in est:
        rows.append(
            (
                "calibrated wall clock",
                f"{format_seconds(est['calibrated_wall_clock_seconds'])}: generation "
                f"{est['calibrated_generation_seconds']:.3g} s per generation batch + training "
                f"{est['calibrated_training_seconds']:.3g} s per step, measured over "
                f"{est['calibration_steps']} steps after a warm-up step",
            )
        )
    rows += [
        (
            f"memory per device ({est['sharding']})",
            f"params {_gb(mem['parameters'])} + grads {_gb(mem['gradients'])} + optimizer "
            f"{_gb(mem['optimizer_states'])} + activations {_gb(mem['activations'])}"
            + (f" + reference model {_gb(mem['reference'])}" if mem.get("reference") else "")
            + f" = {_gb(mem['total'])} training; sampling adds {_gb(est['sampling_memory'])} (key/value cache"
            + (", whole weights gathered)" if est["weights_gathered"] else ")"),
        ),
        ("memory levers", est["memory_levers"]),
        ("memory formula", est["memory_formula"]),
        ("rollout formula", est["rollout_formula"]),
    ]
    if "fits" in est:
        capacity = (
            f" of {_gb(est['device_memory'])}" if est["device_memory"] else " (host memory, not checked)"
        )
        verdict = "yes" if est["fits"] else "WARNING: does not fit"
        rows.append(("fits", f"{verdict}: {_gb(est['peak_memory'])}{capacity}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


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


def _memory_formula(fsdp, quantization, eight_bit_states: bool) -> str:
    """The memory formula of the layout (ZeRO or FSDP2), plus the quantised base's and 8-bit states' terms."""
    formula = FSDP2_MEMORY_FORMULA if fsdp else MEMORY_FORMULA
    return (
        formula
        + (QUANTIZED_FORMULA if quantization else "")
        + (EIGHT_BIT_FORMULA if eight_bit_states else "")
    )


def _peak_flops(device, precision: str) -> float:
    peak = device.peak_flops.get(precision)
    if peak is None:
        raise ValueError(
            f"{device.name} has no {precision} peak in the accelerator table; choose another --gpu"
        )
    return peak


def _gb(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"
