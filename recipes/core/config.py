"""Recipe configs: YAML files plus `--field value` overrides, parsed into typed dataclasses.

A recipe declares one dataclass; every field is a YAML key and a command-line flag, its `help`
metadata is the --help text, and a key the dataclass does not have is an error that names it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")
# What an optimizer step with a non-finite loss or gradient norm does (see core/train/nonfinite.py).
ON_NONFINITE_CHOICES = ("stop", "skip")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and how to fix it."""


def field(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    unset: Any = None,
) -> Any:
    """A config field: its default, its --help text and, for numbers, the range a value must lie in
    (`unset`: one more value outside the range that means "not set", e.g. max_steps -1)."""
    metadata = {"help": help, "minimum": minimum, "maximum": maximum, "unset": unset}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TrainingConfig:
    """Fields every recipe shares; names and meanings follow transformers.TrainingArguments."""

    model_name_or_path: str = field("", "Hub id or local directory of the pretrained model.")
    dataset_name: str = field(
        "",
        "Hub id, a data file (.jsonl/.json/.csv/.parquet/.txt), a directory of split files (train.jsonl, ...) "
        "or a directory written by Dataset(Dict).save_to_disk.",
    )
    dataset_config_name: str | None = field(None, "Configuration name of a Hub dataset, if it has several.")
    train_split: str = field(
        "train", "Split to train on; slices as in datasets: train[:10%], train[100:200], train+validation."
    )
    eval_split: str | None = field(
        "validation", "Split to evaluate on (slices allowed); null disables evaluation."
    )
    eval_split_size: float | None = field(
        None,
        "When the dataset has no eval_split: hold out this many training rows (>= 1) or this fraction of them "
        "(< 1) for evaluation, drawn with the seed; they are never trained on.",
        minimum=0,
    )
    dataset_num_proc: int | None = field(
        None,
        "Processes that tokenise the data in parallel (datasets.map num_proc); the result is cached.",
        minimum=1,
    )
    output_dir: str = field(
        "outputs/run", "Where plan.json, metrics.jsonl, config.yaml and final/ are written."
    )
    per_device_train_batch_size: int = field(8, "Micro batch size on each data-parallel rank.", minimum=1)
    per_device_eval_batch_size: int = field(8, "Eval batch size on each rank.", minimum=1)
    gradient_accumulation_steps: int = field(1, "Micro batches per optimizer step on each rank.", minimum=1)
    global_batch_size: int | None = field(
        None,
        "Samples per optimizer step over all ranks; when set, gradient_accumulation_steps is derived from it.",
        minimum=1,
    )
    num_train_epochs: float = field(
        1.0, "Passes over the training data (ignored when max_steps > 0).", minimum=0
    )
    max_steps: int = field(
        -1, "Total optimizer steps; > 0 overrides num_train_epochs, -1 means not set.", minimum=1, unset=-1
    )
    learning_rate: float = field(5e-5, "Peak learning rate of the linear warmup/decay schedule.", minimum=0)
    weight_decay: float = field(
        0.0, "AdamW weight decay (not applied to biases and norm weights).", minimum=0
    )
    adam_beta1: float = field(0.9, "AdamW beta1.", minimum=0, maximum=1)
    adam_beta2: float = field(0.999, "AdamW beta2.", minimum=0, maximum=1)
    adam_epsilon: float = field(1e-8, "AdamW epsilon.", minimum=0)
    optim: str = field(
        "adamw_torch_fused",
        "AdamW as TrainingArguments names it: adamw_torch_fused (one fused kernel per step, several times faster "
        "on CPU and GPU) or adamw_torch (per tensor), the same update; adamw_bnb_8bit (alias adamw_8bit) or "
        "paged_adamw_8bit: bitsandbytes' AdamW with 8-bit momentum and variance (2 instead of 8 bytes per "
        "trained parameter; tensors under 4,096 elements keep 32-bit states); paged_adamw_32bit. Not under "
        "DeepSpeed.",
    )
    warmup_steps: int = field(0, "Linear warmup steps; > 0 takes precedence over warmup_ratio.", minimum=0)
    warmup_ratio: float = field(
        0.0, "Warmup as a fraction of total optimizer steps, rounded up.", minimum=0, maximum=1
    )
    max_grad_norm: float = field(1.0, "Gradient clipping norm; 0 disables clipping.", minimum=0)
    on_nonfinite: str = field(
        "stop",
        "stop | skip: a step whose loss or gradient norm is not finite. stop: the run stops there (exit "
        "status 2) and keeps the last good checkpoint. skip: that update is dropped (weights and optimizer "
        "state unchanged), logged with skipped: true and counted; the LR schedule still advances, so step "
        "count and LRs stay as planned. The norm is measured even with max_grad_norm 0. Not with DeepSpeed "
        "or fp16.",
    )
    max_consecutive_skips: int = field(
        5, "With on_nonfinite skip: stop (as stop does) once this many steps in a row were skipped."
    )
    mixed_precision: str = field(
        "no",
        "no | bf16 | fp16. The one place precision is set (DeepSpeed configs say auto). bf16 runs on CPUs "
        "too; fp16 needs a GPU. Master weights and optimizer states stay fp32.",
    )
    gradient_checkpointing: bool = field(
        False,
        "Recompute each layer's activations in backward instead of keeping them (non-reentrant): less "
        "memory, about a third more compute, the same losses and weights.",
    )
    attn_implementation: str = field(
        "sdpa",
        "Attention kernel passed to from_pretrained: sdpa | eager | flex_attention | flash_attention_2 | "
        "flash_attention_3 (the flash kernels need their package and a GPU).",
    )
    torch_compile: bool = field(
        False,
        "Compile the model's repeated layers with torch.compile (inductor; on CPU it needs a C++ compiler). "
        "Set pad_to_multiple_of so that batch shapes repeat instead of recompiling.",
    )
    memory_census: bool = field(
        False,
        "Count each process's model-state bytes from its tensors (parameters, gathered parameters, gradients, "
        "master weights, optimizer states, buckets) after loading the model, at the loop's start, at the end of "
        "a forward and of its backward, and after an optimizer step, with the resident set then and its peak; "
        "written to the run's last metrics record (a diagnosis, not a default: each count walks the heap).",
    )
    pad_to_multiple_of: int | None = field(
        None,
        "Pad every batch's length (or packed row) up to a multiple of this; null pads to the longest.",
        minimum=1,
    )
    seed: int = field(42, "Seed for model init, data order and dropout.", minimum=0)
    logging_steps: int = field(1, "Write a metrics.jsonl record every this many optimizer steps.", minimum=1)
    eval_steps: int = field(
        0, "Evaluate every this many optimizer steps (0: only before and after training).", minimum=0
    )
    save_steps: int = field(
        0,
        "Write output_dir/checkpoint-<step> every this many optimizer steps; 0 saves only the final model.",
        minimum=0,
    )
    save_total_limit: int | None = field(
        None,
        "Keep only the newest N complete checkpoints (older ones go after a new one is complete).",
        minimum=1,
    )
    resume_from_checkpoint: str | None = field(
        None, "null: start at step 0; latest: newest complete checkpoint in output_dir; or a checkpoint path."
    )
    overwrite_output_dir: bool = field(
        False, "Allow starting over in an output_dir that holds another run's config or checkpoints."
    )
    dataloader_drop_last: bool = field(False, "Drop the last incomplete batch of each epoch.")
    dataloader_num_workers: int = field(0, "DataLoader worker processes.", minimum=0)
    max_train_samples: int | None = field(
        None, "Use only the first N training samples (for quick runs).", minimum=1
    )
    max_eval_samples: int | None = field(None, "Use only the first N eval samples.", minimum=1)
    trust_remote_code: bool = field(False, "Allow model/tokenizer code from the model repository to run.")
    report_to: str = field(
        "tensorboard",
        "Trackers for metrics: tensorboard, wandb, ..., all, or none (comma-separated list allowed).",
    )
    use_peft: bool = field(
        False, "Train LoRA adapters (peft) instead of all weights; the pretrained weights stay frozen."
    )
    lora_r: int = field(16, "LoRA rank.", minimum=1)
    lora_alpha: int = field(
        32, "LoRA scaling numerator: adapters are scaled by lora_alpha / lora_r.", minimum=1
    )
    lora_dropout: float = field(
        0.0,
        "Dropout on the LoRA input; > 0 draws masks per micro-batch (GA equivalence then inexact).",
        minimum=0,
        maximum=1,
    )
    lora_target_modules: list[str] = dataclasses.field(
        default_factory=list,
        metadata={"help": "Linear layers that get an adapter; empty: every projection of the architecture."},
    )
    modules_to_save: list[str] = dataclasses.field(
        default_factory=list,
        metadata={"help": "Modules trained in full next to the adapters; empty: the classification head."},
    )
    merge_adapter: bool = field(
        False, "With use_peft, also write output_dir/merged/: the adapter folded into a plain model."
    )
    load_in_4bit: bool = field(
        False,
        "Load the pretrained linear layers quantised to 4 bits (bitsandbytes; QLoRA with use_peft: true, which "
        "it needs). Embeddings, norms and the LM head stay fp32.",
    )
    load_in_8bit: bool = field(
        False,
        "Load the pretrained linear layers quantised to 8 bits (bitsandbytes LLM.int8); needs use_peft.",
    )
    bnb_4bit_quant_type: str = field("nf4", "4-bit data type: nf4 (NormalFloat) or fp4.")
    bnb_4bit_use_double_quant: bool = field(
        False, "Quantise the 4-bit blocks' scales too (about 0.37 fewer bits per parameter)."
    )
    bnb_4bit_compute_dtype: str = field(
        "float32",
        "float32 | bfloat16 | float16: the dtype 4-bit weights are dequantised to for each matrix product.",
    )
    bnb_4bit_quant_storage: str = field(
        "uint8",
        "uint8 | float32 | bfloat16 | float16: the dtype the packed 4-bit values are stored in (the same bits); "
        "FSDP2 needs it equal to the dtype of the other parameters to shard them together.",
    )


def parse_config(cls: type[C], argv: list[str] | None = None) -> C:
    """Build `cls` from `--config FILE` (optional) and `--field value` overrides in `argv`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(cls))
        raise SystemExit(0)
    config_path, overrides = _split_argv(argv)
    values: dict[str, Any] = load_yaml(config_path) if config_path else {}
    sources = dict.fromkeys(values, str(config_path))  # where each value came from, for the error
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key, raw in overrides.items():
        _check_known(key, known, where="the command line")
        values[key], sources[key] = _parse_override(key, raw, hints[key]), "the command line"
    return build(cls, values, where=sources)


def build(cls: type[C], values: dict[str, Any], where: str | dict[str, str] = "config") -> C:
    """Instantiate `cls` from a plain dict, converting and checking every value against its type and its
    field's range. `where` names where the values came from (per key, or one place for all)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        source = where.get(key, "config") if isinstance(where, dict) else where
        _check_known(key, set(fields), where=source)
        kwargs[key] = _coerce(key, value, hints[key], source)
        _check_range(key, kwargs[key], fields[key].metadata, source)
    config = cls(**kwargs)
    _check_schedule(config, where)
    return config


def _parse_override(key: str, raw: str, hint: Any) -> Any:
    """A command-line value as the type of its field reads it.

    Strings stay verbatim, so that `--mixed_precision no` is not read as YAML's false. Lists and mappings
    are YAML flow values (`[a, b]`, `{f1: {average: micro}}`), and a list may also be written `a,b`.
    """
    kinds = {hint, *typing.get_args(hint)} if _is_union(hint) else {hint}
    if str in kinds and raw.lower() not in ("null", "none", "~"):
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or err
        raise ConfigError(
            f"--{key} {raw!r} on the command line is not a valid value ({problem}); write lists as "
            "[a, b] or a,b and mappings as {key: value}, quoted for the shell"
        ) from None
    takes_list = any(typing.get_origin(kind) is list for kind in kinds)
    if takes_list and isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _check_range(key: str, value: Any, metadata: Any, where: str) -> None:
    """A number lies in its field's range (or is the field's `unset` value)."""
    low, high, unset = metadata.get("minimum"), metadata.get("maximum"), metadata.get("unset")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value == unset:
        return
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = []
        if low is not None:
            bounds.append(f">= {low}")
        if high is not None:
            bounds.append(f"<= {high}")
        also = f", or {unset} (not set)" if unset is not None else ""
        raise ConfigError(f"{key} in {where} must be {' and '.join(bounds)}{also}, got {value}")


def _check_schedule(config: Any, where: str | dict[str, str]) -> None:
    """A run trains at least one step: num_train_epochs > 0 unless max_steps is set."""
    epochs, max_steps = getattr(config, "num_train_epochs", 1), getattr(config, "max_steps", -1)
    if epochs <= 0 and max_steps == -1:
        source = where.get("num_train_epochs", "config") if isinstance(where, dict) else where
        raise ConfigError(
            f"num_train_epochs in {source} is {epochs:g} and max_steps is not set, so the run would train "
            "no step; set num_train_epochs above 0 or max_steps to the number of optimizer steps"
        )


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A recipe YAML's mapping of field: value."""
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config with the path of a recipe YAML")
    return read_mapping(path)


class ConfigFileError(ConfigError):
    """A config file that is missing or does not parse to a mapping. The message is what a recipe stops
    with; problem, fix and line are the same error as `recipes doctor` reports it."""

    def __init__(self, message: str, problem: str, fix: str, line: int | None = None) -> None:
        super().__init__(message)
        self.problem, self.fix, self.line = problem, fix, line


# What a rule over configs yields: (key, problem, fix). Whoever reports it says where the key is: its file,
# and for `recipes doctor` its line.
Problem = tuple[str, str, str]


def describe_problem(where: str, key: str, problem: str, fix: str) -> str:
    """One problem as `recipes doctor` prints it and a run stops with it."""
    return f"{where}: {key}: {problem}\n    fix: {fix}"


class ConfigProblems(ConfigError):
    """Configs that disagree, found before training: each (where, key, problem, fix), all in one message."""

    def __init__(self, found: list[tuple[str, str, str, str]]) -> None:
        self.found = found
        listed = "\n".join(describe_problem(*one) for one in found)
        super().__init__(f"{len(found)} config problem(s) found before training:\n{listed}")


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML file (JSON when named *.json) holds; an empty file holds {}."""
    path = Path(path)
    if not path.is_file():
        fix = "pass the path of an existing file"
        raise ConfigFileError(f"{path} does not exist; {fix}", "file does not exist", fix)
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        at, fix = f"line {err.lineno}, column {err.colno}", _json_fix(err)
        raise ConfigFileError(
            f"{path} is not valid JSON at {at}: {err.msg}; {fix}",
            f"invalid JSON: {err.msg} (column {err.colno})",
            fix,
            err.lineno,
        ) from None
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None) or err
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        fix = "fix the syntax at that line"
        raise ConfigFileError(
            f"{path} is not valid YAML{at}: {problem}; {fix}",
            f"invalid YAML: {problem}",
            fix,
            mark.line + 1 if mark else None,
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        found = type(data).__name__
        raise ConfigFileError(
            f"{path} must hold a mapping of field: value, found {found}; write key: value pairs",
            f"holds a {found}, not a mapping",
            "write key: value pairs",
        )
    return data


def _json_fix(err: json.JSONDecodeError) -> str:
    if "delimiter" in err.msg or "property name" in err.msg:
        return "check commas between entries (none after the last one) and double-quoted keys"
    return "fix the JSON syntax at that line"


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config; it parses back into the same dataclass."""
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def help_text(cls: type) -> str:
    lines = [f"{cls.__name__}: pass --config FILE.yaml and/or --field value", ""]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
        lines.append(f"  --{f.name} ({kind}, default {default!r})\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _split_argv(argv: list[str]) -> tuple[str | None, dict[str, str]]:
    config_path, overrides = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(
                f"unexpected argument {arg!r}; arguments are --config FILE and --field value pairs"
            )
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value, e.g. --{key} VALUE")
            value = argv[i + 1]
            i += 1
        if key == "config":
            config_path = value
        else:
            overrides[key.replace("-", "_")] = value
        i += 1
    return config_path, overrides


def _check_known(key: str, known: set[str], where: str) -> None:
    if key not in known:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; run with --help to list the fields"
        raise ConfigError(f"unknown config key {key!r} in {where}{hint}")


def _coerce(key: str, value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0], where)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key} in {where} must be a list, got {value!r}")
        return [_coerce(key, v, args[0], where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} in {where} must be a mapping such as {{name: value}}, got {value!r}")
        return {_coerce(key, k, args[0], where): _coerce(key, v, args[1], where) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} in {where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} in {where} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 5e-5 as a string
            except ValueError:
                pass
        raise ConfigError(f"{key} in {where} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        quote = (
            " (quote it: YAML reads unquoted no/yes/on/off as booleans)" if isinstance(value, bool) else ""
        )
        raise ConfigError(f"{key} in {where} must be a string, got {value!r}{quote}")
    return value
