"""The DeepSpeed contract: which keys of a DeepSpeed config the recipe owns, what a config may not say next
to a recipe on a topology, and how the recipe's values fill it.

Hyper-parameters live in the recipe YAML and DeepSpeed tuning in the ds JSON; where both could set a value
(RECIPE_OWNED) the JSON says "auto" and the recipe decides. Neither consumer of the JSON fills those values
from the recipe: Accelerate fills "auto" on its own (clipping silently becomes 1.0, and a number in the JSON
beats the recipe's accumulation with only a warning), and `deepspeed.initialize`, which the pipeline recipe
calls, rejects "auto". So one set of rules serves three callers: `recipes doctor` reports the problems with
their lines (core/doctor/deepspeed.py), a run checks and fills the config Accelerate built before `prepare`
(core/distributed/accelerator.py), and the pipeline recipe the config it hands to DeepSpeed
(core/distributed/pipeline.py). The rules name the config's keys; their callers say which file holds them.

No torch or DeepSpeed import, so that the doctor stays fast.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from recipes.core.config import ConfigProblems, Problem
from recipes.core.model.optimizer import BITSANDBYTES_OPTIMIZERS
from recipes.core.plan.steps import resolve_gradient_accumulation

# The keys the recipe owns, each with the recipe value it must equal as the messages name it. "auto", or no
# key at all, takes the recipe's value (`fill`); any other value must agree with it (`problems`).
RECIPE_OWNED = {
    "train_micro_batch_size_per_gpu": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient accumulation",
    "train_batch_size": "micro x GA x data-parallel size",
    "gradient_clipping": "max_grad_norm",
    "bf16.enabled": "mixed_precision",
    "fp16.enabled": "mixed_precision",
}
# Blocks the recipe builds itself: its scheduler is the schedule plan.json records, its optimizer AdamW.
RECIPE_BUILT = ("scheduler", "optimizer")
GATHER_ON_SAVE = (  # DeepSpeed's spellings of one ZeRO-3 setting: alias, field name, deprecated name
    "stage3_gather_16bit_weights_on_model_save",
    "gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save",
)
AUTO_FIX = 'set it to "auto" (the recipe\'s value is used)'
_MISSING = object()


class DeepSpeedConfigError(ConfigProblems):
    """A DeepSpeed config that contradicts the recipe or cannot do what the recipe needs."""


@dataclass(frozen=True)
class DeepSpeedRun:
    """What a run decides that its DeepSpeed config has to agree with: the recipe's values on a topology."""

    micro_batch_size: int
    gradient_accumulation_steps: int | None  # None: global_batch_size does not divide (the recipe check says)
    max_grad_norm: float | None  # None: a recipe config that does not say, nothing to check
    mixed_precision: str
    data_parallel_size: int | None  # None: the pipeline stages do not divide the world size
    pipeline_stages: int = 1
    pipeline_engine: bool = False  # DeepSpeed's PipelineEngine runs the model, not Accelerate
    keeps_best_model: bool = False  # the recipe keeps the weights of its best evaluation (classify)
    optim: str = "adamw_torch_fused"
    quant_storage: str | None = None  # bnb_4bit_quant_storage of a 4-bit base; None: not 4-bit
    recipe_file: str = "recipe config"

    @classmethod
    def of(
        cls,
        recipe: Mapping[str, Any],
        world_size: int,
        ds: Mapping[str, Any] | None = None,
        recipe_file: str = "recipe config",
    ) -> DeepSpeedRun:
        """The run a recipe's config (its fields by name, defaults filled in) makes on `world_size`
        processes; `ds` may set the pipeline stages."""
        stages = pipeline_stages(ds, recipe)
        dp = world_size // stages if world_size % stages == 0 else None
        micro, ga = recipe.get("per_device_train_batch_size", 8), None
        if dp is not None:
            try:
                ga = resolve_gradient_accumulation(
                    recipe.get("gradient_accumulation_steps", 1), recipe.get("global_batch_size"), micro, dp
                )
            except ValueError:  # the recipe's own check reports it
                ga = None
        return cls(
            micro_batch_size=micro,
            gradient_accumulation_steps=ga,
            max_grad_norm=recipe.get("max_grad_norm"),
            mixed_precision=recipe.get("mixed_precision", "no"),
            data_parallel_size=dp,
            pipeline_stages=stages,
            # A recipe with a DeepSpeed config of its own drives the engine itself (sft_pipeline.py).
            pipeline_engine=stages > 1 or bool(recipe.get("deepspeed_config")),
            keeps_best_model=bool(recipe.get("metric_for_best_model")),
            optim=recipe.get("optim", "adamw_torch_fused"),
            quant_storage=recipe.get("bnb_4bit_quant_storage", "uint8")
            if recipe.get("load_in_4bit")
            else None,
            recipe_file=recipe_file,
        )

    def owned_values(self) -> dict[str, Any]:
        """The recipe's value of each key in RECIPE_OWNED; None where it is not known."""
        micro, ga, dp = self.micro_batch_size, self.gradient_accumulation_steps, self.data_parallel_size
        return {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": ga,
            "train_batch_size": micro * ga * dp if ga is not None and dp is not None else None,
            "gradient_clipping": self.max_grad_norm,
            "bf16.enabled": self.mixed_precision == "bf16",
            "fp16.enabled": self.mixed_precision == "fp16",
        }


def pipeline_stages(ds: Mapping[str, Any] | None, recipe: Mapping[str, Any] | None) -> int:
    """The stages of a pipeline run: the DeepSpeed config's pipeline.stages, else the recipe's field."""
    stages = ((ds or {}).get("pipeline") or {}).get("stages")
    if isinstance(stages, int):
        return stages
    return int((recipe or {}).get("pipeline_stages") or 1)


def zero_stage(ds: Mapping[str, Any]) -> Any:
    return (ds.get("zero_optimization") or {}).get("stage", 0)


def precision_enabled(ds: Mapping[str, Any], precision: str) -> bool | None:
    """True/False when the DS config says so explicitly; None for absent or 'auto'."""
    block = ds.get(precision)
    value = block.get("enabled") if isinstance(block, dict) else None
    return value if isinstance(value, bool) else None


# ---------------------------------------------------------------- problems


def problems(ds: Mapping[str, Any], run: DeepSpeedRun) -> list[Problem]:
    """Every problem of the DeepSpeed config `ds` against the run: keys of the DeepSpeed config.
    The recipe config's own keys that the config rules out are `recipe_problems`."""
    return [*config_problems(ds), *run_problems(ds, run)]


def config_problems(ds: Mapping[str, Any]) -> Iterator[Problem]:
    """What a DeepSpeed config may not say next to any recipe."""
    if precision_enabled(ds, "bf16") and precision_enabled(ds, "fp16"):
        fix = 'set both to "auto" and choose mixed_precision in the recipe YAML'
        yield "bf16.enabled", "bf16 and fp16 are both enabled", fix
    for block in (b for b in RECIPE_BUILT if b in ds):
        problem = f"a DeepSpeed {block} block next to the recipe's own {block}: DeepSpeed raises, or "
        problem += f"the run uses a {block} the recipe's plan does not describe"
        fix = f"remove the {block} block; the recipe YAML sets the learning rate, warmup and AdamW settings"
        yield block, problem, fix
    zero = ds.get("zero_optimization") or {}
    gather = next((zero[key] for key in GATHER_ON_SAVE if key in zero), None)
    if zero_stage(ds) == 3 and gather is not True:
        problem = "ZeRO-3 without it (Accelerate fills 'auto' with false): the final save "
        problem += "cannot gather the full model"
        yield f"zero_optimization.{GATHER_ON_SAVE[0]}", problem, "set it to true"


def run_problems(ds: Mapping[str, Any], run: DeepSpeedRun) -> Iterator[Problem]:
    """The DeepSpeed config against the recipe's values and the topology (RECIPE_OWNED, ZeRO with a
    pipeline). An owned key counts as set when it holds a number (or true/false for precision)."""
    stage = zero_stage(ds)
    if run.pipeline_engine and stage in (2, 3):
        problem = f"ZeRO-{stage} with {run.pipeline_stages} pipeline stages: DeepSpeed supports only "
        problem += "ZeRO-0/1 with pipeline parallelism"
        yield "zero_optimization.stage", problem, "use stage 1 (or 0) for pipeline runs"
    if run.data_parallel_size is not None:
        yield from _batch(ds, run)
    clipping = ds.get("gradient_clipping", "auto")
    if clipping != "auto" and run.max_grad_norm is not None and clipping != run.max_grad_norm:
        problem = (
            f"{clipping} differs from the recipe's {RECIPE_OWNED['gradient_clipping']} {run.max_grad_norm}"
        )
        yield "gradient_clipping", problem, AUTO_FIX
    for name in ("bf16", "fp16"):
        enabled = precision_enabled(ds, name)
        if enabled is not None and enabled != (run.mixed_precision == name):
            state = "enabled" if enabled else "disabled"
            problem = f"{state} here, but the recipe's mixed_precision is {run.mixed_precision!r}"
            fix = f'set it to "auto" and mixed_precision: {name} in {run.recipe_file}'
            yield f"{name}.enabled", problem, fix if enabled else AUTO_FIX
    if run.pipeline_engine and run.mixed_precision == "bf16" and stage == 0:
        # bf16 without ZeRO is DeepSpeed's bf16 optimizer: it clips by one stage's norm, and keeps the
        # gradients where the recipe's clipper (PipelineClipper) cannot reach them.
        problem = "ZeRO stage 0, but a bf16 pipeline needs ZeRO stage 1 (DeepSpeed's stage-0 bf16 optimizer "
        problem += "clips by the gradient norm of one stage only)"
        fix = "use --deepspeed_config ds_configs/zero1.json, or mixed_precision: no"
        yield "zero_optimization.stage", problem, fix


def _batch(ds: Mapping[str, Any], run: DeepSpeedRun) -> Iterator[Problem]:
    keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    ds_micro, ds_ga, ds_train = (ds.get(k) if isinstance(ds.get(k), int) else None for k in keys)
    micro, ga, dp = run.micro_batch_size, run.gradient_accumulation_steps, run.data_parallel_size
    if ds_micro is not None and ds_micro != micro:
        problem = f"{ds_micro} differs from the recipe's {RECIPE_OWNED[keys[0]]} {micro}"
        yield keys[0], problem, AUTO_FIX
    if ds_ga is not None and ga is not None and ds_ga != ga:
        problem = f"{ds_ga} differs from the recipe's {RECIPE_OWNED[keys[1]]} {ga}; DeepSpeed's wins "
        problem += "and the run no longer matches its plan"
        yield keys[1], problem, 'set it to "auto"'
    # The global batch DeepSpeed asserts, from the config's own numbers where it has them: one wrong
    # number is reported once.
    micro, ga = micro if ds_micro is None else ds_micro, ga if ds_ga is None else ds_ga
    if ds_train is not None and ga is not None and ds_train != micro * ga * dp:
        product = f"{micro} x {ga} x {dp} = {micro * ga * dp}"
        yield keys[2], f"{ds_train} is not {RECIPE_OWNED[keys[2]]} = {product}", 'set it to "auto"'


def recipe_problems(ds: Mapping[str, Any], run: DeepSpeedRun) -> Iterator[Problem]:
    """What the DeepSpeed config rules out in the recipe config: keys of the recipe config."""
    if run.keeps_best_model and zero_stage(ds) == 3:
        problem = "keeping the best model needs whole weights on every rank, which ZeRO-3 partitions"
        fix = "set metric_for_best_model: null (the last model is then tested and saved) or use ZeRO stage 1 or 2"
        yield "metric_for_best_model", problem, fix
    if run.optim in BITSANDBYTES_OPTIMIZERS:
        problem = f"{run.optim} under DeepSpeed: the ZeRO engine steps the optimizer on flat fp32 partitions "
        problem += "of its own and keeps its states there; bitsandbytes' optimizers are not among those it "
        problem += "supports"
        fix = "use optim: adamw_torch_fused (ZeRO-1/2 already split AdamW's states over the data-parallel ranks, "
        fix += "and ds_zero2_offload.yaml moves them to host memory), or launch with DDP (or one process) to "
        fix += "keep 8-bit states"
        yield "optim", problem, fix
    precision = {"bf16": "bfloat16", "fp16": "float16"}.get(run.mixed_precision)
    if precision and run.quant_storage not in (None, "uint8", precision):
        problem = f"{run.quant_storage} storage of 4-bit weights under DeepSpeed {run.mixed_precision}: the "
        problem += "engine casts every floating-point parameter to its 16-bit type, which would change the "
        problem += "packed 4-bit values"
        yield "bnb_4bit_quant_storage", problem, f"use uint8 (the default) or {precision}"


def zero3_init_problems(ds: Mapping[str, Any], zero3_init_flag: Any) -> list[Problem]:
    """ZeRO-3 must build the model partitioned (zero.Init, Accelerate's zero3_init_flag, true by default
    for a ZeRO-3 config): otherwise every process loads the whole model before DeepSpeed partitions it.
    A key of the accelerate config."""
    if zero_stage(ds) != 3 or str(zero3_init_flag).lower() != "false":
        return []
    problem = "false under ZeRO-3: every process loads the whole model before it is partitioned, so a "
    problem += "model that does not fit on one device cannot load"
    return [("deepspeed_config.zero3_init_flag", problem, "remove it or set it to true")]


def check(ds: Mapping[str, Any], run: DeepSpeedRun, file: str) -> None:
    """Raise DeepSpeedConfigError listing every problem of `ds` (read from `file`) against the run."""
    found = [(file, *p) for p in problems(ds, run)]
    found += [(run.recipe_file, *p) for p in recipe_problems(ds, run)]
    if found:
        raise DeepSpeedConfigError(found)


# ---------------------------------------------------------------- filling


def fill(config: dict[str, Any], run: DeepSpeedRun, written: Mapping[str, Any] | None = None) -> None:
    """Each key the recipe owns that `written` leaves "auto" or unset takes the recipe's value in `config`
    (in place; `check` first). `written` is the config as its file says it, where `config` has been added
    to since (Accelerate gives a file without gradient_accumulation_steps a 1); by default `config`."""
    written = config if written is None else written
    for key, value in run.owned_values().items():
        if value is not None and _get(written, key) in ("auto", _MISSING):
            _set(config, key, value)


def fill_model_values(config: dict[str, Any], model: Any) -> None:
    """Fill ZeRO-3's "auto" stage3_max_live_parameters and stage3_max_reuse_distance (in place, before
    `accelerator.prepare`) from the parameter count of the model's largest repeated layer: two layers'
    worth may be gathered at once (the one computing and the one prefetched), and a gathered parameter
    stays gathered only if it is used again within one layer's worth of the traced module order.

    DeepSpeed's defaults (1e9 each) keep every parameter of a model under a billion parameters gathered
    from its forward to its backward (measured with memory_census: the whole model on every process at
    the end of the forward), so ZeRO-3 held more than ZeRO-2. With these values a layer is released
    after its forward, a layer recomputed under activation checkpointing stays gathered for its backward,
    and the head stays gathered across the turn from forward to backward. Accelerate does not fill these
    "auto"s; DeepSpeed would silently replace them with its defaults.
    """
    zero = config.get("zero_optimization") or {}
    if zero.get("stage") != 3:
        return
    layer = largest_layer_parameters(model)
    for key, value in (("stage3_max_live_parameters", 2 * layer), ("stage3_max_reuse_distance", layer)):
        if zero.get(key) == "auto":
            zero[key] = value


def largest_layer_parameters(model: Any) -> int:
    """Parameters of the model's largest repeated layer (its `_no_split_modules` classes), counted from
    the full shapes also when ZeRO-3 has partitioned them; the largest module with parameters of its own
    when the model names no layer class."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        layers = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]

    def numel(module: Any) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())

    return max((numel(m) for m in layers), default=0)


def _get(config: Mapping[str, Any], dotted_key: str) -> Any:
    node: Any = config
    for part in dotted_key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set(config: dict[str, Any], dotted_key: str, value: Any) -> None:
    *parents, last = dotted_key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
