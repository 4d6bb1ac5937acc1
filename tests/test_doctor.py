"""`recipes doctor`: every check reports a minimal broken config with the right file and key; every
config the project ships passes; the recipe runs the same checks at start-up."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, in_process

from recipes.cli import main, recipe_of_config
from recipes.core.config import ConfigError
from recipes.core.doctor import known_keys
from recipes.core.doctor.accelerate_config import check_accelerate, check_hostfile, parse_hostfile
from recipes.core.doctor.deepspeed import check_deepspeed, check_deepspeed_with_run
from recipes.core.doctor.diagnose import diagnose, preflight
from recipes.core.doctor.findings import DoctorError, load_config_file, report
from recipes.core.doctor.recipe import check_precision_on_device, check_recipe
from recipes.sft import SFTConfig

MULTI = {
    "distributed_type": "MULTI_GPU",
    "num_machines": 2,
    "num_processes": 16,
    "machine_rank": 0,
    "main_process_ip": "10.0.0.1",
    "main_process_port": 29500,
}
RECIPE = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "mixed_precision": "no"}
ZERO = {"zero_optimization": {"stage": 2}}


def keys(findings):
    return [f.key for f in findings]


# ---------------------------------------------------------------- accelerate config


def test_num_processes_not_a_multiple_of_num_machines():
    findings = check_accelerate({**MULTI, "num_processes": 15}, "a.yaml")
    assert keys(findings) == ["num_processes"]
    assert "15 processes are not a multiple of num_machines 2" in findings[0].problem


def test_machine_rank_outside_range():
    findings = check_accelerate({**MULTI, "machine_rank": 2}, "a.yaml")
    assert keys(findings) == ["machine_rank"]
    assert findings[0].problem == "machine_rank 2 is outside 0..1"


def test_missing_main_process_ip_for_multi_machine():
    acc = {k: v for k, v in MULTI.items() if k != "main_process_ip"}
    assert keys(check_accelerate(acc, "a.yaml")) == ["main_process_ip"]


def test_hostfile_slots_that_do_not_sum_to_num_processes(tmp_path):
    hosts = parse_hostfile("# two machines\nnode1 slots=8\nnode2 slots=4   # short one\n")
    assert hosts == {"node1": 8, "node2": 4}
    findings = check_hostfile(hosts, 16, 2, "hostfile", "a.yaml")
    assert keys(findings) == ["slots"]
    assert findings[0].problem == "slots sum to 8 + 4 = 12, but a.yaml has num_processes 16"


def test_hostfile_named_in_the_accelerate_config_is_checked(tmp_path):
    (tmp_path / "hostfile").write_text("node1 slots=8\n")
    acc = {
        **MULTI,
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {
            "deepspeed_hostfile": str(tmp_path / "hostfile"),
            "deepspeed_multinode_launcher": "pdsh",
        },
    }
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(acc))
    assert keys(diagnose(str(tmp_path / "a.yaml"))) == ["slots", "hosts"]


def test_unknown_launcher_name():
    acc = {
        **MULTI,
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {"deepspeed_multinode_launcher": "pdshh"},
    }
    assert keys(check_accelerate(acc, "a.yaml")) == ["deepspeed_config.deepspeed_multinode_launcher"]


def test_unknown_distributed_type():
    assert keys(check_accelerate({"distributed_type": "MULTI_GPUS"}, "a.yaml")) == ["distributed_type"]


def test_dynamic_rendezvous_contradicts_same_network():
    findings = check_accelerate({**MULTI, "rdzv_backend": "c10d", "same_network": True}, "a.yaml")
    assert keys(findings) == ["rdzv_backend"]
    assert "contradicts same_network: true" in findings[0].problem
    assert check_accelerate({**MULTI, "rdzv_backend": "c10d", "same_network": False}, "a.yaml") == []
    assert keys(check_accelerate({**MULTI, "rdzv_backend": "zeus"}, "a.yaml")) == ["rdzv_backend"]


@pytest.mark.parametrize(
    "field", ["zero_stage", "gradient_accumulation_steps", "gradient_clipping", "offload_optimizer_device"]
)
def test_fields_accelerate_rejects_next_to_a_deepspeed_config_file(field):
    acc = {
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {"deepspeed_config_file": "ds.json", field: 1},
    }
    assert keys(check_accelerate(acc, "a.yaml")) == [f"deepspeed_config.{field}"]


def test_mixed_precision_next_to_a_deepspeed_config_file():
    acc = {
        "distributed_type": "DEEPSPEED",
        "mixed_precision": "no",
        "deepspeed_config": {"deepspeed_config_file": "ds.json"},
    }
    assert keys(check_accelerate(acc, "a.yaml")) == ["mixed_precision"]


# ---------------------------------------------------------------- DeepSpeed config


def test_deepspeed_accumulation_that_differs_from_the_recipe():
    findings = check_deepspeed_with_run({**ZERO, "gradient_accumulation_steps": 4}, RECIPE, 2, "ds.json")
    assert keys(findings) == ["gradient_accumulation_steps"]
    assert findings[0].problem.startswith("4 differs from the recipe's gradient accumulation 2")


def test_train_batch_size_not_micro_x_ga_x_dp():
    findings = check_deepspeed_with_run({**ZERO, "train_batch_size": 32}, RECIPE, 2, "ds.json")
    assert keys(findings) == ["train_batch_size"]
    assert "= 4 x 2 x 2 = 16" in findings[0].problem  # micro 4 x GA 2 x 2 data-parallel ranks
    assert check_deepspeed_with_run({**ZERO, "train_batch_size": 16}, RECIPE, 2, "ds.json") == []


def test_bf16_and_fp16_both_on():
    ds = {**ZERO, "bf16": {"enabled": True}, "fp16": {"enabled": True}}
    assert keys(check_deepspeed(ds, "ds.json")) == ["bf16.enabled"]


def test_precision_the_named_gpu_lacks():
    findings = check_precision_on_device("bf16", "V100-32GB", "r.yaml", "mixed_precision")
    assert keys(findings) == ["mixed_precision"]
    assert findings[0].fix == "use fp16 mixed precision on V100-32GB"
    assert check_precision_on_device("bf16", "A100-80GB", "r.yaml", "mixed_precision") == []


@pytest.mark.parametrize("block", ["scheduler", "optimizer"])
def test_scheduler_or_optimizer_block_next_to_the_recipes_own(block):
    assert keys(check_deepspeed({**ZERO, block: {"type": "AdamW", "params": {}}}, "ds.json")) == [block]


def test_zero3_without_gathering_weights_on_save():
    findings = check_deepspeed({"zero_optimization": {"stage": 3}}, "ds.json")
    assert keys(findings) == ["zero_optimization.stage3_gather_16bit_weights_on_model_save"]
    zero3 = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}
    assert check_deepspeed(zero3, "ds.json") == []


def test_zero3_inline_in_the_accelerate_config_without_16bit_save():
    acc = {"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 3}}
    assert keys(check_accelerate(acc, "a.yaml")) == ["deepspeed_config.zero3_save_16bit_model"]


def test_zero3_without_zero_init_is_refused_statically_and_at_start_up(tmp_path, capsys):
    # zero3_init_flag: false would load the whole model in every process before DeepSpeed partitions it.
    acc = yaml.safe_load((REPO / "accelerate_configs/ds_zero3.yaml").read_text())
    acc["deepspeed_config"]["deepspeed_config_file"] = str(REPO / "ds_configs/zero3.json")
    acc["deepspeed_config"]["zero3_init_flag"] = False
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(acc))
    assert main(["doctor", "--accelerate-config", str(tmp_path / "a.yaml")]) == 1
    out = capsys.readouterr().out
    assert "deepspeed_config.zero3_init_flag: false under ZeRO-3: every process loads the whole model" in out
    assert "fix: remove it or set it to true" in out
    env = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "ds_configs/zero3.json"),
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false",
    }
    with pytest.raises(DoctorError, match="zero3_init_flag: false under ZeRO-3"):
        preflight(SFTConfig(), 2, env)
    preflight(SFTConfig(), 2, {**env, "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"})
    zero2 = {**env, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "ds_configs/zero2.json")}
    preflight(SFTConfig(), 2, zero2)  # only ZeRO-3 partitions parameters


def test_offload_to_nvme_without_a_path():
    ds = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}}
    assert keys(check_deepspeed(ds, "ds.json")) == ["zero_optimization.offload_optimizer.nvme_path"]


def test_zero2_or_3_with_pipeline_stages():
    ds = {"zero_optimization": {"stage": 2}, "pipeline": {"stages": 2}}
    assert keys(check_deepspeed_with_run(ds, RECIPE, 4, "ds.json")) == ["zero_optimization.stage"]
    ds1 = {"zero_optimization": {"stage": 1}, "pipeline": {"stages": 2}}
    assert check_deepspeed_with_run(ds1, RECIPE, 4, "ds.json") == []


def test_recipe_doctor_and_deepspeed_check_share_one_accumulation_rule():
    from recipes.core.plan.steps import resolve_gradient_accumulation

    recipe = {**RECIPE, "global_batch_size": 32}  # 32 samples / (micro 4 x 2 ranks) = GA 4, not the 2 set
    assert resolve_gradient_accumulation(2, 32, 4, 2) == 4
    assert check_deepspeed_with_run({**ZERO, "gradient_accumulation_steps": 4}, recipe, 2, "ds.json") == []
    findings = check_deepspeed_with_run({**ZERO, "gradient_accumulation_steps": 2}, recipe, 2, "ds.json")
    assert findings[0].problem.startswith("2 differs from the recipe's gradient accumulation 4")
    with pytest.raises(ConfigError, match=r"global_batch_size 20 is not divisible by .* = 4 x 2 = 8"):
        resolve_gradient_accumulation(2, 20, 4, 2)
    assert keys(check_recipe({**RECIPE, "global_batch_size": 20}, 2)) == ["global_batch_size"]


def test_pipeline_stages_that_do_not_divide_the_world_size():
    ds = {"zero_optimization": {"stage": 1}, "pipeline": {"stages": 3}}
    assert keys(check_deepspeed_with_run(ds, RECIPE, 4, "ds.json")) == ["pipeline.stages"]


# ---------------------------------------------------------------- recipe config


def test_global_batch_size_not_divisible_by_micro_x_dp():
    findings = check_recipe({**RECIPE, "global_batch_size": 20}, 3, "r.yaml")
    assert keys(findings) == ["global_batch_size"]
    assert "= 4 x 3 = 12" in findings[0].problem


def test_warmup_longer_than_training():
    assert keys(check_recipe({**RECIPE, "max_steps": 10, "warmup_steps": 11}, 1)) == ["warmup_steps"]
    assert check_recipe({**RECIPE, "max_steps": 10, "warmup_steps": 10}, 1) == []
    # 100 samples / micro 4 = 25 batches on 1 rank -> ceil(25 / 2) = 13 steps, 1 epoch
    assert keys(check_recipe({**RECIPE, "warmup_steps": 14}, 1, num_samples=100)) == ["warmup_steps"]
    assert check_recipe({**RECIPE, "warmup_steps": 13}, 1, num_samples=100) == []
    assert keys(check_recipe({**RECIPE, "warmup_ratio": 1.0}, 1)) == ["warmup_ratio"]


def test_max_steps_ending_before_one_epoch_while_epochs_are_set():
    recipe = {**RECIPE, "max_steps": 5, "num_train_epochs": 3}
    findings = check_recipe(
        recipe, 1, "r.yaml", keys_in_file={"max_steps", "num_train_epochs"}, num_samples=100
    )
    assert keys(findings) == ["max_steps"]
    assert (
        "ends before one epoch (13 steps) while num_train_epochs is 3: max_steps wins" in findings[0].problem
    )
    assert check_recipe(recipe, 1, "r.yaml", keys_in_file={"max_steps"}, num_samples=100) == []


def test_grpo_epochs_are_counted_in_prompts_of_whole_groups():
    """A GRPO step trains micro 16 x GA 2 = 32 completions, 4 prompts of 8 generations: 512 prompts make 128
    steps an epoch (counted as SFT samples they would make 16), so 100 warmup steps fit and 129 do not."""
    from recipes.grpo import GRPOConfig

    grpo = {
        **dataclasses.asdict(GRPOConfig()),
        "per_device_train_batch_size": 16,
        "gradient_accumulation_steps": 2,
    }
    assert check_recipe({**grpo, "warmup_steps": 100}, 1, num_samples=512) == []
    (finding,) = check_recipe({**grpo, "warmup_steps": 129}, 1, num_samples=512)
    assert finding.key == "warmup_steps" and "training has only 128 steps" in finding.problem
    # 3 generations do not divide a generation batch of 32 completions: the recipe's own refusal
    (finding,) = check_recipe({**grpo, "num_generations": 3}, 1, num_samples=512)
    assert finding.key == "num_generations" and "num_generations" in finding.problem


# ---------------------------------------------------------------- files


def test_json_syntax_error_with_line_number(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {"stage": 2},\n  "bf16": {"enabled": "auto"},\n}\n')
    data, findings = load_config_file(path)
    assert data is None and len(findings) == 1
    assert findings[0].line == 4 and findings[0].problem.startswith("invalid JSON")


def test_yaml_syntax_error_with_line_number(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(
        "num_machines: 1\nnum_processes: 2\ndeepspeed_config:\n  zero_stage: [1\nmachine_rank: 0\n"
    )
    _, findings = load_config_file(path)
    assert len(findings) == 1 and findings[0].problem.startswith("invalid YAML")
    assert findings[0].line == 5


def test_unknown_keys_name_the_closest_valid_key(tmp_path):
    (tmp_path / "ds.json").write_text(
        json.dumps({"zero_optimization": {"stage": 2, "overlap_com": True}}, indent=1)
    )
    (tmp_path / "a.yaml").write_text(
        f"num_proceses: 2\ndeepspeed_config:\n  deepspeed_config_file: {tmp_path}/ds.json\n"
    )
    (tmp_path / "sft_x.yaml").write_text("learning_rat: 0.1\n")
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    findings = diagnose(
        str(tmp_path / "a.yaml"), recipe_config=str(tmp_path / "sft_x.yaml"), recipe_fields=fields
    )
    assert sorted((Path(f.file).name, f.key, f.fix, f.line) for f in findings) == [
        ("a.yaml", "num_proceses", "did you mean 'num_processes'?", 1),
        ("ds.json", "zero_optimization.overlap_com", "did you mean 'overlap_comm'?", 4),
        ("sft_x.yaml", "learning_rat", "did you mean 'learning_rate'?", 1),
    ]


def test_key_lists_read_from_accelerate_and_deepspeed_hold_every_key_the_shipped_configs_use():
    for path in sorted((REPO / "accelerate_configs").glob("*.yaml")):
        acc = yaml.safe_load(path.read_text())
        assert set(acc) <= known_keys.accelerate_keys(), path.name
        assert set(acc.get("deepspeed_config") or {}) <= known_keys.accelerate_deepspeed_keys(), path.name
        assert acc["distributed_type"] in known_keys.distributed_types(), path.name
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        ds = json.loads(path.read_text())
        zero = ds.get("zero_optimization") or {}
        assert set(ds) <= known_keys.DEEPSPEED_KEYS and set(zero) <= known_keys.zero_keys(), path.name
        for block, known in known_keys.offload_keys().items():
            assert set(zero.get(block) or {}) <= known, path.name
    assert {"fp16", "dynamo_backend"} <= known_keys.accelerate_keys()  # older spellings Accelerate converts


def test_deepspeed_field_names_aliases_and_deprecated_spellings_are_all_accepted():
    # stage3_prefetch_bucket_size is the alias of prefetch_bucket_size; cpu_offload is deprecated.
    zero = {"stage": 3, "prefetch_bucket_size": 1, "stage3_prefetch_bucket_size": 1, "cpu_offload": False}
    for gather in ("stage3_gather_16bit_weights_on_model_save", "gather_16bit_weights_on_model_save"):
        assert check_deepspeed({"zero_optimization": {**zero, gather: True}}, "ds.json") == []


@pytest.mark.parametrize(
    "check, config, key, closest",
    [
        (
            check_accelerate,
            {"distributed_type": "NO", "mixed_precison": "no"},
            "mixed_precison",
            "mixed_precision",
        ),
        (
            check_accelerate,
            {
                "distributed_type": "DEEPSPEED",
                "deepspeed_config": {"zero_stage": 1, "offload_param_devce": "cpu"},
            },
            "deepspeed_config.offload_param_devce",
            "offload_param_device",
        ),
        (check_deepspeed, {"gradient_clippping": 1.0}, "gradient_clippping", "gradient_clipping"),
        (
            check_deepspeed,
            {"zero_optimization": {"stage": 1, "reduce_bucket_sise": 5}},
            "zero_optimization.reduce_bucket_sise",
            "reduce_bucket_size",
        ),
        (
            check_deepspeed,
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memroy": True}}},
            "zero_optimization.offload_optimizer.pin_memroy",
            "pin_memory",
        ),
    ],
)
def test_a_misspelt_key_is_caught_with_the_closest_valid_key(check, config, key, closest):
    findings = check(config, "config")
    assert [(f.key, f.problem, f.fix) for f in findings] == [
        (key, "unknown key", f"did you mean {closest!r}?")
    ]


@pytest.mark.slow  # a fresh interpreter
def test_importing_the_doctor_loads_neither_accelerate_nor_deepspeed():
    code = "import sys, recipes.core.doctor.diagnose; "
    code += "print(sorted({'accelerate', 'deepspeed', 'torch'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------- shipped configs and the command


def shipped_runs():
    """Every accelerate config (with the DeepSpeed config and hostfile it names) with every recipe config
    it can launch: pipeline topologies go with pipeline recipes, every other topology with the rest."""
    accelerate = sorted((REPO / "accelerate_configs").glob("*.yaml"))
    recipes = sorted((REPO / "recipes" / "configs").glob("*.yaml"))
    return [(a, r) for a in accelerate for r in recipes if ("pipeline" in a.stem) == ("pipeline" in r.stem)]


@pytest.mark.parametrize("acc, recipe", shipped_runs(), ids=lambda p: p.name)
def test_every_shipped_config_passes_doctor_with_no_finding(acc, recipe, monkeypatch):
    monkeypatch.chdir(REPO)  # configs name their DeepSpeed JSON and hostfile relative to the repo root
    fields = defaults = None
    try:
        config_class = recipe_of_config(str(recipe)).config_class
    except Exception:  # a recipe the plan command does not know: checked without its field list
        config_class = None
    if config_class is not None:
        fields = {f.name for f in dataclasses.fields(config_class)}
        defaults = dataclasses.asdict(config_class())
    findings = diagnose(
        str(acc.relative_to(REPO)),
        recipe_config=str(recipe.relative_to(REPO)),
        recipe_fields=fields,
        recipe_defaults=defaults,
    )
    # The classification job keeps its best evaluation's weights, which ZeRO-3 partitions: the run refuses
    # the combination at start-up, and the doctor says so.
    refused = ["metric_for_best_model"] if "zero3" in acc.stem and recipe.stem.startswith("classify") else []
    # The preference job starts from the SFT job's final/, which is there once that job has run.
    model = yaml.safe_load(recipe.read_text()).get("model_name_or_path", "")
    if model.startswith("outputs/") and not (REPO / model).is_dir():
        refused = ["model_name_or_path", *refused]
    assert [f.key for f in findings] == refused, report(findings)


def test_every_shipped_deepspeed_config_passes_on_its_own():
    paths = sorted((REPO / "ds_configs").glob("*.json"))
    assert paths
    for path in paths:
        findings = diagnose(deepspeed_config=str(path))
        assert findings == [], report(findings)


def test_doctor_command_exits_1_with_findings_and_0_when_clean(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert (
        main(
            [
                "doctor",
                "--accelerate-config",
                "accelerate_configs/ds_zero3.yaml",
                "--config",
                "recipes/configs/sft_smollm2.yaml",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == "doctor: no problems found"
    (tmp_path / "a.yaml").write_text(
        "num_machines: 2\nnum_processes: 3\nmachine_rank: 0\nmain_process_ip: h\n"
    )
    assert main(["doctor", "--accelerate-config", str(tmp_path / "a.yaml")]) == 1
    out = capsys.readouterr().out
    assert out.startswith(
        f"{tmp_path / 'a.yaml'}:2: num_processes: 3 processes are not a multiple of num_machines 2"
    )
    assert "\n    fix: set num_processes to num_machines x processes per machine" in out


# ---------------------------------------------------------------- recipes run the checks at start-up


def test_preflight_reads_the_deepspeed_config_the_launcher_names(tmp_path):
    (tmp_path / "ds.json").write_text(
        json.dumps({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}})
    )
    cfg = SFTConfig(per_device_train_batch_size=4)
    env = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(tmp_path / "ds.json"),
        "ACCELERATE_CONFIG_DS_FIELDS": "deepspeed_config_file,gradient_clipping",
    }
    with pytest.raises(DoctorError) as err:
        preflight(cfg, 2, env)
    message = str(err.value)
    assert message.startswith("2 config problem(s) found before training:")
    assert f"{tmp_path / 'ds.json'}: scheduler: a DeepSpeed scheduler block" in message
    assert "accelerate config: gradient_clipping: set next to deepspeed_config_file" in message
    preflight(cfg, 2, {})  # nothing to complain about without DeepSpeed


def test_preflight_refuses_skip_in_the_pipeline_recipe_whose_engine_applies_each_update(monkeypatch):
    from recipes.sft_pipeline import SFTPipelineConfig

    monkeypatch.chdir(REPO)  # the recipe names its DeepSpeed JSON relative to the repo root
    preflight(SFTPipelineConfig(), 2, env={})
    with pytest.raises(DoctorError) as err:
        preflight(SFTPipelineConfig(on_nonfinite="skip"), 2, env={})
    message = str(err.value)
    assert message.startswith("1 config problem(s) found before training:\n")
    assert (
        "on_nonfinite: skip cannot be honoured by a recipe that drives the DeepSpeed engine itself" in message
    )
    assert (
        "fix: use on_nonfinite: stop (the run stops at that step and keeps the last good checkpoint)\n"
        in (message + "\n")
    )
    with pytest.raises(
        DoctorError, match="recipe config: pipeline_stages: 4 stages do not divide the world size 2"
    ):
        preflight(SFTPipelineConfig(pipeline_stages=4), 2, env={})


def test_preflight_refuses_keeping_the_best_model_under_zero3_only():
    from recipes.classify import ClassifyConfig

    env = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "ds_configs/zero3.json"),
    }
    with pytest.raises(DoctorError) as err:
        preflight(ClassifyConfig(), 2, env)
    assert str(err.value) == (
        "1 config problem(s) found before training:\n"
        "recipe config: metric_for_best_model: keeping the best model needs whole weights on every rank, which "
        "ZeRO-3 partitions\n    fix: set metric_for_best_model: null (the last model is then tested and saved) "
        "or use ZeRO stage 1 or 2"
    )
    preflight(ClassifyConfig(metric_for_best_model=None), 2, env)
    preflight(
        ClassifyConfig(), 2, {**env, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "ds_configs/zero2.json")}
    )


def test_recipe_runs_the_doctors_checks_before_it_loads_anything(tmp_path):
    # The model path does not exist: reaching the model would fail differently, so the doctor ran first.
    args = ["--config", "recipes/configs/sft_smollm2.yaml", "--model_name_or_path", str(tmp_path / "none")]
    args += ["--output_dir", str(tmp_path / "out"), "--max_steps", "5", "--warmup_steps", "10"]
    with pytest.raises(DoctorError) as err:
        in_process("sft", args)
    assert "warmup_steps: 10 warmup steps, but training has only 5 steps" in str(err.value)
    assert not (tmp_path / "out").exists()
