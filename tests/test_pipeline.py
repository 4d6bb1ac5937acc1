"""Pipeline-parallel SFT (recipes/sft_pipeline.py) against the plain SFT recipe on one process.

20 training samples at micro batch 2 make 10 batches. With global batch 8, one process accumulates 4
micro-batches per step, a 2 x 2 pipeline-data grid 2 per rank, and a 2-stage pipeline alone 4: every
epoch has 3 optimizer steps (windows of 8, 8 and 4 samples), the same samples in the same steps on
every topology, so the per-step losses, gradient norms and final weights must agree.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import (
    SFT_DATA,
    eval_records,
    launch,
    load_plan,
    load_weights,
    make_tiny_decoder,
    max_weight_diff,
    train_records,
)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from recipes.cli import main as recipes_cli
from recipes.core.pipeline import (
    ModelSource,
    PipelineConfigError,
    TiedLayerSpec,
    TokenLoss,
    build_pipeline,
    layer_specs,
    resolve_ds_config,
)
from recipes.core.pipeline_plan import (
    bubble_fraction,
    micro_batches_for_bubble,
    module_boundaries,
    pipeline_view,
)
from recipes.core.steps import data_parallel_size

ONE_PROCESS, PIPELINE = "accelerate_configs/cpu.yaml", "accelerate_configs/pipeline_2proc.yaml"
SFT_CONFIG, PIPELINE_CONFIG = "recipes/configs/sft_smollm2.yaml", "recipes/configs/sft_pipeline_smollm2.yaml"
MAX_GRAD_NORM = 1.0
TRAINING = [
    "--dataset_name", str(SFT_DATA), "--max_train_samples", "20", "--max_eval_samples", "10",
    "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4", "--global_batch_size", "8",
    "--max_seq_length", "64", "--learning_rate", "1e-3", "--warmup_steps", "1", "--weight_decay", "0.01",
    "--max_grad_norm", str(MAX_GRAD_NORM), "--seed", "7", "--logging_steps", "1", "--eval_steps", "0",
]  # fmt: skip


def run(
    config: str, script: str, recipe_config: str, model, out, epochs: int, processes=None, extra=()
) -> str:
    args = ["--config", recipe_config, "--model_name_or_path", str(model), "--output_dir", str(out), *extra]
    launch(config, script, [*args, *TRAINING, "--num_train_epochs", str(epochs)], num_processes=processes)
    return str(out)


def sft(model, out, epochs):
    return run(ONE_PROCESS, "recipes/sft.py", SFT_CONFIG, model, out, epochs)


def pipeline(model, out, epochs, processes, extra=()):
    return run(PIPELINE, "recipes/sft_pipeline.py", PIPELINE_CONFIG, model, out, epochs, processes, extra)


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    return make_tiny_decoder(tmp_path_factory.mktemp("llama4"), "llama", num_layers=4)


@pytest.fixture(scope="module")
def sft_run(llama4, tmp_path_factory):
    return sft(llama4, tmp_path_factory.mktemp("sft"), epochs=2)


@pytest.fixture(scope="module")
def two_stage_run(llama4, tmp_path_factory):
    return pipeline(llama4, tmp_path_factory.mktemp("pp2"), epochs=2, processes=2)


def assert_same_training(pipe_dir: str, sft_dir: str, rel: float = 1e-4) -> None:
    pipe, ref = train_records(pipe_dir), train_records(sft_dir)
    assert [r["step"] for r in pipe] == [r["step"] for r in ref]
    assert [r["tokens"] for r in pipe] == [r["tokens"] for r in ref]
    assert [r["lr"] for r in pipe] == [r["lr"] for r in ref]
    for p, r in zip(pipe, ref, strict=True):
        assert p["loss"] == pytest.approx(r["loss"], rel=rel), p["step"]
        assert p["grad_norm"] == pytest.approx(r["grad_norm"], rel=rel), p["step"]
    pipe_eval, ref_eval = eval_records(pipe_dir), eval_records(sft_dir)
    assert [r["step"] for r in pipe_eval] == [r["step"] for r in ref_eval]
    for p, r in zip(pipe_eval, ref_eval, strict=True):
        assert p["eval_loss"] == pytest.approx(r["eval_loss"], rel=rel)
    assert max_weight_diff(load_weights(f"{pipe_dir}/final"), load_weights(f"{sft_dir}/final")) < 1e-4


def test_two_stage_pipeline_trains_exactly_like_single_process_sft(two_stage_run, sft_run):
    records = train_records(two_stage_run)
    assert len(records) == 6
    # Clipping is exercised: some steps' norms exceed max_grad_norm and the weights still agree.
    assert any(r["grad_norm"] > MAX_GRAD_NORM for r in records)
    assert_same_training(two_stage_run, sft_run)
    plan = load_plan(two_stage_run)
    assert (plan["pipeline_stages"], plan["data_parallel_size"], plan["gradient_accumulation_steps"]) == (
        2,
        1,
        4,
    )


def test_two_stages_by_two_data_parallel_follow_plan_and_match_sft(llama4, sft_run, tmp_path):
    out = pipeline(llama4, tmp_path / "pp4", epochs=2, processes=4)
    plan = load_plan(out)
    assert (plan["world_size"], plan["pipeline_stages"], plan["data_parallel_size"]) == (4, 2, 2)
    # 10 batches over 2 data-parallel ranks = 5 per rank; windows of 2, 2, 1 -> 3 steps per epoch.
    assert (plan["gradient_accumulation_steps"], plan["batches_per_epoch_per_rank"]) == (2, 5)
    assert plan["total_optimizer_steps"] == 6
    records = train_records(out)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [r["lr"] for r in records] == [0.0, 1e-3, 8e-4, 6e-4, 4e-4, 2e-4]
    assert plan["pipeline"]["layer_partition"] == [
        "stage 0: embedding, layers 0-1",
        "stage 1: layers 2-3, norm + lm_head",
    ]
    assert_same_training(out, sft_run)


def test_exported_model_reloads_and_generates_like_the_sft_model(two_stage_run, sft_run):
    prompt = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    outputs = []
    for directory in (f"{two_stage_run}/final", f"{sft_run}/final"):
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        generated = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert generated.shape == (1, ids.shape[1] + 8)
        outputs.append(generated.tolist())
    assert outputs[0] == outputs[1]


def test_tied_qwen2_trains_through_a_zero1_pipeline_like_sft(tmp_path):
    model = make_tiny_decoder(tmp_path / "qwen2", "qwen2", num_layers=2)
    ref = sft(model, tmp_path / "sft", epochs=1)
    # ZeRO-1 shards optimizer states and clips with DeepSpeed's own (pipeline-aware) norm.
    out = pipeline(model, tmp_path / "pp", 1, 2, extra=["--deepspeed_config", "ds_configs/zero1.json"])
    assert len(train_records(out)) == 3
    assert_same_training(out, ref)
    exported = load_weights(f"{out}/final")
    assert "lm_head.weight" not in exported and "model.embed_tokens.weight" in exported
    reloaded = AutoModelForCausalLM.from_pretrained(f"{out}/final", dtype=torch.float32)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("family", ["llama", "llama_tied", "qwen2", "mistral"])
def test_split_layers_compute_the_models_own_forward(family, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        make_tiny_decoder(tmp_path, family, num_layers=4), dtype=torch.float32
    )
    if family == "mistral":
        model.config.sliding_window = 4  # shorter than the input, so the sliding-window mask matters
    torch.manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
    x, tied = (input_ids, attention_mask), {}
    for spec in layer_specs(ModelSource(model)):
        if isinstance(spec, TiedLayerSpec):
            module = tied.setdefault(spec.key, spec.build())
            x = spec.forward_fn(module, x) if spec.forward_fn else module(x)
        else:
            x = spec.build()(x)
    assert bool(model.config.tie_word_embeddings) == bool(tied)
    assert torch.equal(x[0], expected[0])
    assert torch.equal(x[1, :6], expected[1, :6])


def test_plan_layout_is_deepspeeds_type_partition():
    from deepspeed.runtime.utils import partition_balanced

    for layers in range(1, 33):
        for stages in range(1, min(layers, 8) + 1):
            weights = [0] + [1] * layers + [0, 0]  # embedding, decoder layers, norm, head
            assert module_boundaries(layers, stages) == partition_balanced(weights, stages), (layers, stages)


def test_bubble_fraction_and_advice():
    assert bubble_fraction(2, 4) == pytest.approx(1 / 5)
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert micro_batches_for_bubble(4) == 12  # 3 / (m + 3) <= 0.2
    assert pipeline_view(30, 2, 4, 4)["bubble_advice"] is None
    view = pipeline_view(30, 4, 1, 4)
    assert view["layer_partition"] == [
        "stage 0: embedding, layers 0-7",
        "stage 1: layers 8-15",
        "stage 2: layers 16-22",
        "stage 3: layers 23-29, norm + lm_head",
    ]
    assert view["bubble_advice"].startswith(
        "stages idle 43% of each step; use at least 12 micro-batches per step"
    )


def test_recipes_plan_shows_the_pipeline_view(llama4, capsys):
    args = ["plan", "--config", PIPELINE_CONFIG, "--num-processes", "4", "--num-samples", "256", "--json"]
    assert recipes_cli([*args, "--model_name_or_path", str(llama4)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["data_parallel_size"], shown["gradient_accumulation_steps"]) == (2, 2)  # 16 / (4 x 2)
    assert shown["pipeline"]["micro_batches_per_step"] == 2
    assert shown["pipeline"]["bubble_fraction"] == pytest.approx(1 / 3)
    assert "use at least 4 micro-batches per step" in shown["pipeline"]["bubble_advice"]


# ---------------------------------------------------------------- clear errors


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_2_and_3_are_refused(stage):
    with pytest.raises(
        PipelineConfigError, match=f"sets ZeRO stage {stage}, but pipeline parallelism works with ZeRO"
    ):
        resolve_ds_config({"zero_optimization": {"stage": stage}}, 2, 4, 1, 1.0, "ds.json")


def test_zero_2_is_refused_by_the_launched_recipe_before_deepspeed_asserts(tmp_path, llama4):
    ds = tmp_path / "zero2.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": "auto"}))
    args = [
        "--config",
        PIPELINE_CONFIG,
        "--model_name_or_path",
        str(llama4),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    result = launch(PIPELINE, "recipes/sft_pipeline.py", [*args, "--deepspeed_config", str(ds)], check=False)
    assert result.returncode != 0
    assert (
        f"error: {ds} sets ZeRO stage 2, but pipeline parallelism works with ZeRO stage 0 or 1 only"
        in result.stderr
    )
    assert "AssertionError" not in result.stderr


def test_stages_that_do_not_divide_the_world_size_are_refused():
    with pytest.raises(
        ValueError, match="world size 4 is not divisible by pipeline_stages x tensor_parallel_size"
    ):
        data_parallel_size(4, 3)


def test_more_stages_than_layers_are_refused(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(make_tiny_decoder(tmp_path, "llama", num_layers=2))
    with pytest.raises(ValueError, match="pipeline_stages 3 is more than the model's 2 decoder layers"):
        build_pipeline(model, 3, TokenLoss())


def test_unknown_architecture_is_refused():
    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=4, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(PipelineConfigError, match="the pipeline splitter does not know model_type 'gpt2'"):
        build_pipeline(model, 2, TokenLoss())


def test_ds_config_values_the_recipe_owns_must_be_auto():
    resolved = resolve_ds_config(
        {"gradient_clipping": "auto", "zero_optimization": {"stage": 1}}, 2, 4, 2, 0.5, "d"
    )
    assert resolved["train_batch_size"] == 16 and resolved["gradient_clipping"] == 0.5
    with pytest.raises(
        PipelineConfigError, match="sets train_micro_batch_size_per_gpu = 4 but the recipe resolves it to 2"
    ):
        resolve_ds_config({"train_micro_batch_size_per_gpu": 4}, 2, 4, 1, 1.0, "d")


def test_the_deepspeed_launchers_local_rank_argument_is_ignored():
    from recipes.sft_pipeline import recipe_args

    assert recipe_args(["--config", "c.yaml", "--local_rank=1", "--seed", "3"]) == [
        "--config",
        "c.yaml",
        "--seed",
        "3",
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            ["--packing", "true"],
            "packing: the pipeline recipe trains padded batches only; set packing: false",
        ),
        (
            ["--on_nonfinite", "skip"],
            "on_nonfinite: skip cannot be honoured by a recipe that drives the DeepSpeed engine itself",
        ),
    ],
)
def test_options_the_pipeline_cannot_honour_are_refused_before_it_starts(tmp_path, override, message):
    from recipes.core.config import ConfigError
    from recipes.sft_pipeline import main

    with pytest.raises(ConfigError, match=re.escape(message)):
        main(["--config", PIPELINE_CONFIG, "--output_dir", str(tmp_path), *override])
