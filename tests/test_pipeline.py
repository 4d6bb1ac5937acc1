"""Pipeline-parallel SFT (recipes/sft_pipeline.py) against the plain SFT recipe on one process.

The runs are the shared job (helpers.JOB): 8 samples per optimizer step, so one process accumulates 4
micro-batches of 2, a 2-stage pipeline alone 4 as well, and a 2 x 2 pipeline-data grid 2 per rank: the
same samples in the same steps on every topology (6 per epoch, the last window short), so the per-step
losses, gradient norms and final weights must agree.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import (
    JOB_STEPS,
    PIPELINE,
    PIPELINE_CONFIG,
    adam_tolerance,
    assert_curves_and_tensorboard_losses,
    assert_same_training,
    bf16_loss_tolerance,
    in_process,
    job_args,
    launch,
    load_plan,
    load_weights,
    make_tiny_decoder,
    run_sums,
    step_loss_tolerance,
    train_records,
    weight_distance,
)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from recipes.cli import main as recipes_cli
from recipes.core.distributed.deepspeed_contract import DeepSpeedConfigError, DeepSpeedRun
from recipes.core.distributed.pipeline import (
    ModelSource,
    PipelineConfigError,
    TiedLayerSpec,
    build_pipeline,
    layer_specs,
    resolve_ds_config,
)
from recipes.core.doctor.findings import DoctorError
from recipes.core.plan.pipeline_layout import (
    bubble_fraction,
    decoder_layer_ranges,
    micro_batches_for_bubble,
    module_boundaries,
    pipeline_view,
)
from recipes.core.plan.steps import data_parallel_size, linear_warmup_decay_lr

MAX_GRAD_NORM = 0.5  # the shared job's


def stage_weight_elements(model_dir, stages: int) -> list[int]:
    """Parameter elements each stage needs, from the checkpoint's own tensors: the embedding with the first
    stage's layers, the norm and head with the last's (a tied head: the embedding again)."""
    weights = load_weights(model_dir)
    tied = "lm_head.weight" not in weights
    layers = len({k.split(".")[2] for k in weights if k.startswith("model.layers.")})
    counts = []
    for stage, (start, stop) in enumerate(decoder_layer_ranges(layers, stages)):
        names = {f"model.layers.{i}." for i in range(start, stop)}
        if stage == 0:
            names.add("model.embed_tokens.")
        if stage == stages - 1:
            names |= {"model.norm.", "model.embed_tokens." if tied else "lm_head."}
        counts.append(sum(t.numel() for k, t in weights.items() if any(k.startswith(n) for n in names)))
    return counts


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    return make_tiny_decoder(tmp_path_factory.mktemp("llama4"), "llama", num_layers=4)


@pytest.mark.slow
def test_two_stage_pipeline_trains_exactly_like_single_process_sft(reference):
    records = train_records(reference("pipeline"))
    assert len(records) == JOB_STEPS
    # Clipping is exercised: the steps' norms exceed max_grad_norm and the weights still agree.
    assert all(r["grad_norm"] > MAX_GRAD_NORM for r in records)
    assert_same_training(reference("pipeline"), reference("1proc"))
    plan = load_plan(reference("pipeline"))
    assert (plan["pipeline_stages"], plan["data_parallel_size"], plan["gradient_accumulation_steps"]) == (
        2,
        1,
        4,
    )
    # Each process read its own stage's weights and nothing else (the model itself was never loaded).
    first, last = stage_weight_elements(reference.model("pipeline"), 2)
    assert plan["pipeline"]["weight_elements_read"] == [first, last]
    assert first + last == sum(t.numel() for t in load_weights(reference.model("pipeline")).values())
    # The final model is written as one shard per stage, never gathered in one process.
    index = json.loads((reference("pipeline") / "final" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


@pytest.mark.slow
def test_pipeline_run_draws_curves_and_logs_every_step_loss_to_tensorboard(reference):
    """No Accelerator runs the pipeline, yet its trackers and curves are those of every other recipe."""
    assert_curves_and_tensorboard_losses(reference("pipeline"), "sft_pipeline", JOB_STEPS)


@pytest.mark.slow
def test_two_stages_by_two_data_parallel_follow_plan_and_match_sft(reference, tiny_llama, tmp_path):
    out = tmp_path / "pp4"
    launch(PIPELINE, "sft_pipeline", job_args(tiny_llama, out, config=PIPELINE_CONFIG), num_processes=4)
    plan = load_plan(out)
    assert (plan["world_size"], plan["pipeline_stages"], plan["data_parallel_size"]) == (4, 2, 2)
    # 22 batches over 2 data-parallel ranks = 11 per rank; windows of 2, 2, 2, 2, 2, 1 -> 6 steps per epoch.
    assert (plan["gradient_accumulation_steps"], plan["batches_per_epoch_per_rank"]) == (2, 11)
    assert plan["total_optimizer_steps"] == JOB_STEPS
    records = train_records(out)
    assert [r["step"] for r in records] == list(range(1, JOB_STEPS + 1))
    assert [r["lr"] for r in records] == [linear_warmup_decay_lr(s, 1e-3, 3, JOB_STEPS) for s in range(1, 13)]
    assert plan["pipeline"]["layer_partition"] == [
        "stage 0: embedding, layer 0",
        "stage 1: layer 1, norm + lm_head",
    ]
    first, last = stage_weight_elements(tiny_llama, 2)
    assert plan["pipeline"]["weight_elements_read"] == [first, first, last, last]  # ranks stage-major
    assert_same_training(out, reference("1proc"))


@pytest.mark.slow
def test_exported_model_reloads_and_generates_like_the_sft_model(reference):
    prompt = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    outputs = []
    for directory in (reference("pipeline") / "final", reference("1proc") / "final"):
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        generated = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert generated.shape == (1, ids.shape[1] + 8)
        outputs.append(generated.tolist())
    assert outputs[0] == outputs[1]


@pytest.mark.slow
def test_tied_qwen2_trains_through_a_zero1_pipeline_like_sft(reference):
    # ZeRO-1 shards optimizer states and clips with DeepSpeed's own (pipeline-aware) norm; the tied
    # embedding lives on both stages and its gradients are summed.
    out = reference("pipeline_zero1_qwen2")
    assert len(train_records(out)) == JOB_STEPS
    assert_same_training(out, reference("1proc_qwen2"))
    exported = load_weights(out / "final")
    assert "lm_head.weight" not in exported and "model.embed_tokens.weight" in exported
    embedding = exported["model.embed_tokens.weight"].numel()
    first, last = stage_weight_elements(reference.model("pipeline_zero1_qwen2"), 2)
    # the last stage reads the tied embedding for its head: the model's elements plus one embedding
    assert load_plan(out)["pipeline"]["weight_elements_read"] == [first, last]
    assert first + last == sum(t.numel() for t in exported.values()) + embedding
    reloaded = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
@pytest.mark.parametrize(
    "lever",
    [
        # the last stage's chunked loss (the reference, the default) against logits of every token
        ["--loss_chunk_tokens", "0"],
        # every decoder layer recomputed in backward (non-reentrant)
        ["--gradient_checkpointing", "true"],
    ],
    ids=["all_logits", "checkpointed_stages"],
)
def test_exact_levers_change_neither_a_loss_nor_a_weight_of_the_pipeline(reference, tmp_path, lever):
    out = tmp_path / "lever"
    launch(PIPELINE, "sft_pipeline", [*reference.args("pipeline"), "--output_dir", str(out), *lever])
    a, b = train_records(out), train_records(reference("pipeline"))
    assert [(r["step"], r["lr"]) for r in a] == [(r["step"], r["lr"]) for r in b]
    theirs, sums = load_weights(reference("pipeline") / "final"), run_sums(reference("pipeline"))
    n_weights = sum(t.numel() for t in theirs.values())
    for x, y in zip(a, b, strict=True):  # the head's sums, or the recomputed stages', in another order
        assert abs(x["loss"] - y["loss"]) <= step_loss_tolerance(y, b, sums, n_weights), (x, y)
    tolerance = adam_tolerance(sums.gradient, [r["lr"] for r in b], n_weights)
    assert weight_distance(load_weights(out / "final"), theirs) <= tolerance


@pytest.mark.slow
def test_qwen3_trains_through_the_pipeline_like_sft(tmp_path):
    """Qwen3 (tied embeddings, a norm on each query and key head) split in 2 stages against recipes/sft.py."""
    model = make_tiny_decoder(tmp_path / "qwen3", "qwen3")
    in_process("sft", job_args(model, tmp_path / "sft"))
    launch(PIPELINE, "sft_pipeline", job_args(model, tmp_path / "pipe", config=PIPELINE_CONFIG))
    assert len(train_records(tmp_path / "pipe")) == JOB_STEPS
    assert_same_training(tmp_path / "pipe", tmp_path / "sft")
    first, last = stage_weight_elements(model, 2)
    assert load_plan(tmp_path / "pipe")["pipeline"]["weight_elements_read"] == [first, last]


@pytest.mark.slow
def test_bf16_pipeline_follows_the_fp32_plan_with_fp32_master_states(reference, tmp_path):
    """A 2-stage ZeRO-1 pipeline of tied Qwen2 in bf16: the plan, steps and LRs of the fp32 run exactly,
    losses to bf16's rounding (bf16_loss_tolerance), and every stage keeps its fp32 master weights and
    Adam states."""
    out = tmp_path / "bf16"
    args = [*reference.args("pipeline_zero1_qwen2"), "--output_dir", str(out), "--mixed_precision", "bf16"]
    launch(PIPELINE, "sft_pipeline", args)
    fp32 = reference("pipeline_zero1_qwen2")
    assert load_plan(out) == load_plan(fp32)
    a, b = train_records(out), train_records(fp32)
    assert [(r["step"], r["tokens"], r["lr"]) for r in a] == [(r["step"], r["tokens"], r["lr"]) for r in b]
    n_weights = sum(t.numel() for t in load_weights(fp32 / "final").values())
    for x, y in zip(a, b, strict=True):
        tolerance = bf16_loss_tolerance(y["loss"], b, y["step"] - 1, n_weights)
        assert abs(x["loss"] - y["loss"]) <= tolerance, (x, y)
    for optimizer_file in sorted((out / "checkpoint-4" / "pytorch_model").glob("*optim_states.pt")):
        saved = torch.load(optimizer_file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        assert {t.dtype for t in saved["single_partition_of_fp32_groups"]} == {torch.float32}
        adam = saved["base_optimizer_state"]["state"]
        assert {t.dtype for state in adam.values() for t in state.values()} == {torch.float32}


@pytest.mark.parametrize("family", ["llama", "llama_tied", "qwen2", "mistral", "qwen3"])
def test_split_layers_compute_the_models_own_forward(family, tmp_path):
    path = make_tiny_decoder(tmp_path, family, num_layers=4)
    if family == "mistral":  # a window shorter than the input, so the sliding-window mask matters
        config = AutoConfig.from_pretrained(path)
        config.sliding_window = 4
        config.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
    x, tied = (input_ids, attention_mask), {}
    # Built from the meta model and the checkpoint, as a pipeline stage builds its layers.
    for spec in layer_specs(ModelSource(str(path))):
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
    assert bubble_fraction(2, 4) == 1 / 5  # one division of the same integers: the same float
    assert bubble_fraction(4, 8) == 3 / 11
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
    assert shown["pipeline"]["bubble_fraction"] == 1 / 3  # one division of the same integers
    assert "use at least 4 micro-batches per step" in shown["pipeline"]["bubble_advice"]


# ---------------------------------------------------------------- clear errors


def pipeline_run(mixed_precision: str = "no", **values) -> DeepSpeedRun:
    """2 stages on 2 x dp processes: micro batch 2, GA 4, max_grad_norm 0.5 unless given."""
    run = dict(micro_batch_size=2, gradient_accumulation_steps=4, max_grad_norm=0.5, data_parallel_size=1)
    run.update(values)
    return DeepSpeedRun(**run, mixed_precision=mixed_precision, pipeline_stages=2, pipeline_engine=True)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_2_and_3_are_refused(stage):
    with pytest.raises(
        DeepSpeedConfigError,
        match=f"ds.json: zero_optimization.stage: ZeRO-{stage} with 2 pipeline stages: DeepSpeed supports only",
    ):
        resolve_ds_config({"zero_optimization": {"stage": stage}}, pipeline_run(), "ds.json")


def test_zero_2_is_refused_by_the_recipe_before_deepspeed_starts(tmp_path, llama4):
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
    with pytest.raises(DoctorError) as err:
        in_process("sft_pipeline", [*args, "--deepspeed_config", str(ds)])
    message = str(err.value)
    assert re.search(
        rf"{re.escape(str(ds))}(:\d+)?: zero_optimization.stage: ZeRO-2 with 2 pipeline stages: DeepSpeed "
        "supports only ZeRO-0/1 with pipeline parallelism",
        message,
    ), message
    assert not (tmp_path / "o").exists()


def test_stages_that_do_not_divide_the_world_size_are_refused():
    with pytest.raises(
        ValueError, match="world size 4 is not divisible by pipeline_stages x tensor_parallel_size"
    ):
        data_parallel_size(4, 3)


def test_more_stages_than_layers_are_refused(tmp_path):
    source = ModelSource(str(make_tiny_decoder(tmp_path, "llama", num_layers=2)))
    with pytest.raises(ValueError, match="pipeline_stages 3 is more than the model's 2 decoder layers"):
        build_pipeline(source, 3)


def test_unknown_architecture_is_refused(tmp_path):
    AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=4, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(PipelineConfigError, match="the pipeline splitter does not know model_type 'gpt2'"):
        ModelSource(str(tmp_path))  # before any weight is read: the directory holds none


def test_ds_config_values_the_recipe_owns_must_be_auto():
    resolved = resolve_ds_config(
        {"gradient_clipping": "auto", "zero_optimization": {"stage": 1}},
        pipeline_run(data_parallel_size=2),
        "d",
    )
    assert resolved["train_batch_size"] == 16 and resolved["gradient_clipping"] == 0.5
    with pytest.raises(
        DeepSpeedConfigError,
        match="d: train_micro_batch_size_per_gpu: 4 differs from the recipe's per_device_train_batch_size 2",
    ):
        resolve_ds_config({"train_micro_batch_size_per_gpu": 4}, pipeline_run(), "d")


def test_bf16_is_the_recipes_field_and_needs_zero1_in_a_pipeline():
    zero1 = {"gradient_clipping": "auto", "zero_optimization": {"stage": 1}, "bf16": {"enabled": "auto"}}
    assert resolve_ds_config(zero1, pipeline_run("bf16"), "d")["bf16"] == {"enabled": True}
    assert "bf16" not in resolve_ds_config(zero1, pipeline_run("no"), "d")
    with pytest.raises(DeepSpeedConfigError) as err:
        resolve_ds_config({**zero1, "bf16": {"enabled": True}}, pipeline_run("no"), "d")
    assert "d: bf16.enabled: enabled here, but the recipe's mixed_precision is 'no'\n" in str(err.value)
    assert 'fix: set it to "auto" and mixed_precision: bf16 in recipe config' in str(err.value)
    # DeepSpeed's stage-0 bf16 optimizer measured one stage's gradient norm: 0.645 where the whole
    # model's was 0.895 on the first step of the shared job, and clipped by it.
    with pytest.raises(
        DeepSpeedConfigError,
        match=r"d: zero_optimization.stage: ZeRO stage 0, but a bf16 pipeline needs ZeRO stage 1 \(DeepSpeed's",
    ):
        resolve_ds_config({"gradient_clipping": "auto"}, pipeline_run("bf16"), "d")


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
        (["--mixed_precision", "fp16"], "mixed_precision 'fp16': the pipeline recipe trains in fp32 or bf16"),
        (["--torch_compile", "true"], "torch_compile: the pipeline recipe does not support it yet"),
    ],
)
def test_options_the_pipeline_cannot_honour_are_refused_before_it_starts(tmp_path, override, message):
    from recipes.core.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        in_process(
            "sft_pipeline", ["--config", PIPELINE_CONFIG, "--output_dir", str(tmp_path / "o"), *override]
        )
    assert not (tmp_path / "o").exists()
