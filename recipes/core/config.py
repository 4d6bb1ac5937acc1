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
# What an optimizer step with a non-finite loss or gradient norm does (see core/nonfinite.py).
ON_NONFINITE_CHOICES = ("stop", "skip")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and how to fix it."""


def field(default: Any, help: str) -> Any:
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainingConfig:
    """Fields every recipe shares; names and meanings follow transformers.TrainingArguments."""

    model_name_or_path: str = field("", "Hub id or local directory of the pretrained model.")
    dataset_name: str = field(
        "",
        "Hub id, a data file (.jsonl/.json/.csv/.parquet), or a directory of split files (train.jsonl, ...).",
    )
    dataset_config_name: str | None = field(None, "Configuration name of a Hub dataset, if it has several.")
    train_split: str = field("train", "Split to train on.")
    eval_split: str | None = field("validation", "Split to evaluate on; null disables evaluation.")
    output_dir: str = field(
        "outputs/run", "Where plan.json, metrics.jsonl, config.yaml and final/ are written."
    )
    per_device_train_batch_size: int = field(8, "Micro batch size on each data-parallel rank.")
    per_device_eval_batch_size: int = field(8, "Eval batch size on each rank.")
    gradient_accumulation_steps: int = field(1, "Micro batches per optimizer step on each rank.")
    global_batch_size: int | None = field(
        None,
        "Samples per optimizer step over all ranks; when set, gradient_accumulation_steps is derived from it.",
    )
    num_train_epochs: float = field(1.0, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = field(-1, "Total optimizer steps; > 0 overrides num_train_epochs, -1 means not set.")
    learning_rate: float = field(5e-5, "Peak learning rate of the linear warmup/decay schedule.")
    weight_decay: float = field(0.0, "AdamW weight decay (not applied to biases and norm weights).")
    adam_beta1: float = field(0.9, "AdamW beta1.")
    adam_beta2: float = field(0.999, "AdamW beta2.")
    adam_epsilon: float = field(1e-8, "AdamW epsilon.")
    optim: str = field(
        "adamw_torch_fused",
        "adamw_torch_fused (one fused kernel per step, several times faster on CPU and GPU) or adamw_torch "
        "(PyTorch's per-tensor AdamW); the same update either way.",
    )
    warmup_steps: int = field(0, "Linear warmup steps; > 0 takes precedence over warmup_ratio.")
    warmup_ratio: float = field(0.0, "Warmup as a fraction of total optimizer steps, rounded up.")
    max_grad_norm: float = field(1.0, "Gradient clipping norm; 0 disables clipping.")
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
    pad_to_multiple_of: int | None = field(
        None, "Pad every batch's length (or packed row) up to a multiple of this; null pads to the longest."
    )
    seed: int = field(42, "Seed for model init, data order and dropout.")
    logging_steps: int = field(1, "Write a metrics.jsonl record every this many optimizer steps.")
    eval_steps: int = field(
        0, "Evaluate every this many optimizer steps (0: only before and after training)."
    )
    save_steps: int = field(
        0, "Write output_dir/checkpoint-<step> every this many optimizer steps; 0 saves only the final model."
    )
    save_total_limit: int | None = field(
        None, "Keep only the newest N complete checkpoints (older ones go after a new one is complete)."
    )
    resume_from_checkpoint: str | None = field(
        None, "null: start at step 0; latest: newest complete checkpoint in output_dir; or a checkpoint path."
    )
    overwrite_output_dir: bool = field(
        False, "Allow starting over in an output_dir that holds another run's config or checkpoints."
    )
    dataloader_drop_last: bool = field(False, "Drop the last incomplete batch of each epoch.")
    dataloader_num_workers: int = field(0, "DataLoader worker processes.")
    max_train_samples: int | None = field(None, "Use only the first N training samples (for quick runs).")
    max_eval_samples: int | None = field(None, "Use only the first N eval samples.")
    trust_remote_code: bool = field(False, "Allow model/tokenizer code from the model repository to run.")
    report_to: str = field(
        "tensorboard",
        "Trackers for metrics: tensorboard, wandb, ..., all, or none (comma-separated list allowed).",
    )
    use_peft: bool = field(
        False, "Train LoRA adapters (peft) instead of all weights; the pretrained weights stay frozen."
    )
    lora_r: int = field(16, "LoRA rank.")
    lora_alpha: int = field(32, "LoRA scaling numerator: adapters are scaled by lora_alpha / lora_r.")
    lora_dropout: float = field(
        0.0, "Dropout on the LoRA input; > 0 draws masks per micro-batch (GA equivalence then inexact)."
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


def parse_config(cls: type[C], argv: list[str] | None = None) -> C:
    """Build `cls` from `--config FILE` (optional) and `--field value` overrides in `argv`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(cls))
        raise SystemExit(0)
    config_path, overrides = _split_argv(argv)
    values: dict[str, Any] = load_yaml(config_path) if config_path else {}
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        _check_known(key, known, where=f"{config_path}")
    hints = typing.get_type_hints(cls)
    for key, raw in overrides.items():
        _check_known(key, known, where="the command line")
        # Strings stay verbatim so that `--mixed_precision no` is not read as YAML's false.
        takes_str = str in (hints[key], *typing.get_args(hints[key]))
        values[key] = raw if takes_str and raw.lower() not in ("null", "none", "~") else yaml.safe_load(raw)
    return build(cls, values, where=str(config_path or "the command line"))


def build(cls: type[C], values: dict[str, Any], where: str = "config") -> C:
    """Instantiate `cls` from a plain dict, converting and checking every value against its type."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        _check_known(key, known, where=where)
        kwargs[key] = _coerce(key, value, hints[key], where)
    return cls(**kwargs)


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
        at = f"line {err.lineno}, column {err.colno}"
        raise ConfigFileError(
            f"{path} is not valid JSON at {at}: {err.msg}",
            f"invalid JSON: {err.msg} (column {err.colno})",
            _json_fix(err),
            err.lineno,
        ) from None
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None) or err
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigFileError(
            f"{path} is not valid YAML{at}: {problem}",
            f"invalid YAML: {problem}",
            "fix the syntax at that line",
            mark.line + 1 if mark else None,
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        found = type(data).__name__
        raise ConfigFileError(
            f"{path} must hold a mapping of field: value, found {found}",
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
