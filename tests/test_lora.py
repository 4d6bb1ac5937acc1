"""LoRA (use_peft) in the SFT and classification recipes: only adapters train, the pretrained weights stay
frozen, the saved adapter and merged model equal the trained model, and the step/schedule/accumulation
guarantees hold on 1 process, DDP, ZeRO-2/3 and FSDP2 (with CPU offload).

Shared SFT runs: 48 samples, 8 samples per optimizer step in every run (1 process micro 2 x GA 4 or
micro 8 x GA 1; 2 processes micro 2 x GA 2), so 6 optimizer steps, and the same samples in each step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    FLOAT64_UNIT_ROUNDOFF,
    OFFLINE,
    ONE_PROCESS,
    REPO,
    SFT_DATA,
    TWO_PROCESSES,
    adam_tolerance,
    classify_args,
    float32_tolerance,
    forward_terms,
    in_process,
    launch,
    load_plan,
    load_weights,
    make_tiny_encoder,
    read_jsonl,
    run_sums,
    step_loss_tolerance,
    train_records,
    weight_distance,
    write_uneven_splits,
)
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from recipes.cli import main as cli_main
from recipes.core.config import ConfigError, parse_config
from recipes.core.data.chat import PadCollator
from recipes.core.losses.accumulation import per_sample_token_loss
from recipes.core.model.lora import DEFAULT_TARGET_MODULES, apply_lora, target_modules
from recipes.data.generators.news_topics import LABELS
from recipes.sft import SFTConfig, load_data

R, ALPHA = 4, 8
SCALE = ALPHA / R
DECODER_TARGETS = {
    "self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}
COMMON = [
    "--config", "recipes/configs/sft_smollm2.yaml", "--dataset_name", str(SFT_DATA), "--max_seq_length", "96",
    "--max_train_samples", "48", "--num_train_epochs", "1", "--learning_rate", "1e-3", "--warmup_steps", "2",
    "--seed", "7", "--report_to", "none", "--use_peft", "true", "--lora_r", str(R), "--lora_alpha", str(ALPHA),
    "--lora_dropout", "0",
]  # fmt: skip
RUNS = {  # name: (accelerate config, micro batch, GA, extra overrides)
    "1proc_micro2_ga4": (ONE_PROCESS, 2, 4,
                         ["--max_eval_samples", "8", "--per_device_eval_batch_size", "4", "--merge_adapter", "true",
                          "--save_steps", "4"]),
    "1proc_micro8_ga1": (ONE_PROCESS, 8, 1, ["--eval_split", "null"]),
    "ddp_micro2_ga2": (TWO_PROCESSES, 2, 2, ["--eval_split", "null"]),
    "zero2_micro2_ga2": ("accelerate_configs/ds_zero2.yaml", 2, 2, ["--eval_split", "null", "--merge_adapter", "true"]),
    "zero3_micro2_ga2": ("accelerate_configs/ds_zero3.yaml", 2, 2, ["--eval_split", "null", "--merge_adapter", "true"]),
    "fsdp2_offload_micro2_ga2": ("accelerate_configs/fsdp2_offload.yaml", 2, 2,
                                 ["--eval_split", "null", "--merge_adapter", "true"]),
}  # fmt: skip
TOTAL_STEPS = 6  # 48 samples / 8 per step


class Runs:
    """`runs[name]`: the output_dir of RUNS[name], made on first use (one-process runs in this process)."""

    def __init__(self, model: Path, tmp_path_factory):
        self.model, self.tmp_path_factory, self.made = model, tmp_path_factory, {}

    def __getitem__(self, name: str) -> Path:
        if name not in self.made:
            config, micro, ga, extra = RUNS[name]
            out = self.tmp_path_factory.mktemp(name)
            args = [*COMMON, "--model_name_or_path", str(self.model), "--output_dir", str(out)]
            args += [
                "--per_device_train_batch_size",
                str(micro),
                "--gradient_accumulation_steps",
                str(ga),
                *extra,
            ]
            if config == ONE_PROCESS:
                in_process("sft", args)
            else:
                launch(config, "sft", args)
            self.made[name] = out
        return self.made[name]


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory) -> Runs:
    return Runs(tiny_llama, tmp_path_factory)


def adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def merge_tolerance(config, input_ids: torch.Tensor, logits: torch.Tensor) -> float:
    """How far a merged model's logits can lie from the adapter's: it multiplies by W + scale B A where peft
    adds scale (x A) B to x W, so the forward (forward_terms) adds in another order along each of the four
    adapted projections a layer's deepest chain passes (query/key/value, output, MLP in and out), R more
    terms and the merged weight's rounding each; relative to the logits."""
    terms = forward_terms(config, input_ids.shape[1]) + 4 * (R + 1) * config.num_hidden_layers
    return float32_tolerance(terms, logits.abs().max().item())


def expected_adapter_shapes(base: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """lora_A (r x in) and lora_B (out x r) for every projection of every layer, named as peft saves them."""
    shapes = {}
    for key, weight in base.items():
        parts = key.split(".")  # model.layers.<i>.<self_attn|mlp>.<proj>.weight
        if len(parts) == 6 and parts[4] in DECODER_TARGETS.get(parts[3], []):
            stem = "base_model.model." + key.removesuffix(".weight")
            shapes[f"{stem}.lora_A.weight"] = (R, weight.shape[1])
            shapes[f"{stem}.lora_B.weight"] = (weight.shape[0], R)
    return shapes


def lr_at(step: int, peak: float = 1e-3, warmup: int = 2, total: int = TOTAL_STEPS) -> float:
    done = step - 1
    return peak * done / warmup if done < warmup else peak * (total - done) / (total - warmup)


# -------------------------------------------------------------------- what trains, what is saved
@pytest.mark.slow
def test_adapter_holds_exactly_the_lora_weights_of_every_projection_and_they_trained(runs, tiny_llama):
    base = load_weights(tiny_llama)
    expected = expected_adapter_shapes(base)
    assert len(expected) == 2 * 7 * 2  # 2 layers x 7 projections x (A, B)
    for name in RUNS:
        saved = adapter(runs[name])
        assert {k: tuple(v.shape) for k, v in saved.items()} == expected, name
        # peft initialises lora_B to zero: every B being non-zero means every adapter was updated.
        assert all(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k), name
    config = json.loads((runs["1proc_micro2_ga4"] / "final" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(DEFAULT_TARGET_MODULES["llama"])
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (
        R,
        ALPHA,
        str(tiny_llama),
    )


@pytest.mark.slow
def test_trained_model_is_the_untouched_pretrained_weights_plus_the_saved_adapter(runs, tiny_llama):
    """The run's final eval loss (its in-memory model) equals the loss of pretrained file + saved adapter:
    a base weight that moved by the learning rate would shift the loss by far more than rounding."""
    from peft import PeftModel

    out = runs["1proc_micro2_ga4"]
    cfg = parse_config(SFTConfig, ["--config", str(out / "config.yaml")])
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    _, eval_set, _ = load_data(cfg, tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out / "final").eval()
    total_loss, total_tokens = 0.0, 0
    for batch in DataLoader(eval_set, batch_size=4, collate_fn=PadCollator(tokenizer.pad_token_id)):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses, counts = per_sample_token_loss(logits, batch["labels"])
        total_loss, total_tokens = total_loss + losses.sum().item(), total_tokens + counts.sum().item()
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, TOTAL_STEPS]
    # The same model, its token losses computed and summed by other kernels: the rounding of those sums.
    tolerance = float32_tolerance(run_sums(out).eval_loss, evals[-1]["eval_loss"])
    assert abs(total_loss / total_tokens - evals[-1]["eval_loss"]) <= tolerance
    assert abs(evals[-1]["eval_loss"] - evals[0]["eval_loss"]) > 1e-3  # the adapter did change the model
    # Only the adapters' parameters were trainable, and the plan says so.
    plan = load_plan(out)
    assert plan["trainable_parameters"] == sum(v.numel() for v in adapter(out).values())
    assert (
        plan["total_parameters"]
        == sum(v.numel() for v in load_weights(tiny_llama).values()) + plan["trainable_parameters"]
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["1proc_micro2_ga4", "zero2_micro2_ga2", "zero3_micro2_ga2", "fsdp2_offload_micro2_ga2"]
)
def test_merged_model_is_base_plus_scaled_adapter_and_every_other_weight_bit_identical(
    runs, tiny_llama, name
):
    base, merged, lora = load_weights(tiny_llama), load_weights(runs[name] / "merged"), adapter(runs[name])
    assert merged.keys() == base.keys()
    assert not (runs[name] / "merged" / "adapter_config.json").exists()
    targets = {
        k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in lora if "lora_A" in k
    }
    for key in base:
        stem = key.removesuffix(".weight")
        if stem in targets:
            lora_b, lora_a = (lora[f"base_model.model.{stem}.lora_{m}.weight"] for m in "BA")
            delta = SCALE * lora_b @ lora_a
            # delta adds R products, which the merge adds in its own order, and the merged weight is
            # rounded to u of its size
            products = (SCALE * lora_b.abs() @ lora_a.abs()).max().item()
            tolerance = float32_tolerance(R, products) + float32_tolerance(1, merged[key].abs().max().item())
            assert (merged[key] - base[key] - delta).abs().max() <= tolerance, key
            assert delta.abs().max() > 1e-5, key
        else:
            assert torch.equal(merged[key], base[key]), key  # embeddings, norms, lm_head


@pytest.mark.slow
def test_merged_model_loads_without_peft_and_gives_the_outputs_of_base_plus_adapter(
    runs, tiny_llama, tmp_path
):
    from peft import PeftModel

    out = runs["1proc_micro2_ga4"]
    input_ids = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 250], [2, 8, 64, 128, 11, 13, 300, 4]])
    torch.save(input_ids, tmp_path / "input_ids.pt")
    script = (
        "import sys, torch; sys.modules['peft'] = None\n"  # peft cannot be imported in this process
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out / 'merged')!r}, dtype=torch.float32).eval()\n"
        f"ids = torch.load({str(tmp_path / 'input_ids.pt')!r})\n"
        f"with torch.no_grad(): torch.save(model(input_ids=ids).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, env=OFFLINE | _path_env())
    merged_logits = torch.load(tmp_path / "logits.pt")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(base, out / "final").eval()(input_ids=input_ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(
            input_ids=input_ids
        ).logits
    assert (merged_logits - peft_logits).abs().max() <= merge_tolerance(base.config, input_ids, peft_logits)
    assert (merged_logits - base_logits).abs().max() > 1e-4  # the merge carried the trained adapter
    assert (
        AutoTokenizer.from_pretrained(out / "merged").chat_template
        == AutoTokenizer.from_pretrained(tiny_llama).chat_template
    )


# -------------------------------------------------------------------- steps, schedule, accumulation
@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["ddp_micro2_ga2", "zero2_micro2_ga2", "zero3_micro2_ga2", "fsdp2_offload_micro2_ga2"]
)
def test_two_process_lora_runs_take_the_planned_steps_at_the_planned_lrs(runs, name):
    plan = load_plan(runs[name])
    assert (plan["world_size"], plan["gradient_accumulation_steps"], plan["total_optimizer_steps"]) == (
        2,
        2,
        6,
    )
    assert plan["warmup_steps"] == 2
    records = train_records(runs[name])
    assert [r["step"] for r in records] == list(range(1, TOTAL_STEPS + 1))
    for r in records:
        # the schedule's factor times the peak, and this formula, each round a quotient and a product
        assert r["lr"] == pytest.approx(lr_at(r["step"]), rel=4 * FLOAT64_UNIT_ROUNDOFF, abs=0)
    # Parameters are counted whole before ZeRO partitions them: the same numbers on every topology.
    reference = load_plan(runs["1proc_micro2_ga4"])
    assert (plan["trainable_parameters"], plan["total_parameters"]) == (
        reference["trainable_parameters"],
        reference["total_parameters"],
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "1proc_micro2_ga4",
        "ddp_micro2_ga2",
        "zero2_micro2_ga2",
        "zero3_micro2_ga2",
        "fsdp2_offload_micro2_ga2",
    ],
)
def test_lora_accumulation_and_data_parallelism_equal_one_big_batch(runs, name):
    ours, reference = runs[name], runs["1proc_micro8_ga1"]
    assert [r["tokens"] for r in train_records(ours)] == [r["tokens"] for r in train_records(reference)]
    records, big, sums = train_records(reference), adapter(reference), run_sums(reference)
    n_weights = sum(t.numel() for t in big.values())
    for a, b in zip(train_records(ours), records, strict=True):  # the same sums, added in another order
        assert abs(a["loss"] - b["loss"]) <= step_loss_tolerance(b, records, sums, n_weights), (a, b)
    tolerance = adam_tolerance(sums.gradient, [r["lr"] for r in records], n_weights)
    assert weight_distance(adapter(ours), big) <= tolerance
    assert (
        max(v.abs().max().item() for k, v in big.items() if "lora_B" in k) > 1e-3
    )  # trained past the tolerance


@pytest.mark.slow
def test_recipes_plan_reports_the_parameter_counts_the_run_reported(runs, capsys):
    out = runs["1proc_micro2_ga4"]
    assert (
        cli_main(
            ["plan", "--config", str(out / "config.yaml"), "--recipe", "sft", "--num-samples", "48", "--json"]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    run_plan = load_plan(out)
    assert (printed["trainable_parameters"], printed["total_parameters"]) == (
        run_plan["trainable_parameters"],
        run_plan["total_parameters"],
    )
    # Without LoRA every parameter trains: the adapters are gone from the total.
    cli_main(["plan", "--config", str(out / "config.yaml"), "--recipe", "sft", "--num-samples", "48", "--json",
              "--use_peft", "false", "--merge_adapter", "false"])  # fmt: skip
    full = json.loads(capsys.readouterr().out)
    assert (
        full["trainable_parameters"]
        == full["total_parameters"]
        == run_plan["total_parameters"] - run_plan["trainable_parameters"]
    )


# -------------------------------------------------------------------- checkpoints and resume
@pytest.mark.slow
def test_checkpoint_holds_the_pretrained_weights_bit_identical_and_resume_continues_the_lora_run(
    runs, tiny_llama, tmp_path
):
    """The run that saved checkpoint-4 (of 6 steps) is the reference; a run resumed from that checkpoint
    into another output_dir ends with the same adapter and logs the same last steps."""

    reference = runs["1proc_micro2_ga4"]
    checkpoint = reference / "checkpoint-4"
    state = load_file(str(checkpoint / "model.safetensors"))  # the whole trained model after 4 steps
    base = load_weights(tiny_llama)
    frozen = {
        k.removeprefix("base_model.model.").replace(".base_layer", ""): v
        for k, v in state.items()
        if ".lora_" not in k
    }
    assert frozen.keys() == base.keys()
    assert all(torch.equal(frozen[k], base[k]) for k in base)  # steps 2-4 ran at LRs 5e-4 and 1e-3
    resumed = tmp_path / "resumed"
    _, micro, ga, extra = RUNS["1proc_micro2_ga4"]
    args = [*COMMON, "--model_name_or_path", str(tiny_llama), "--output_dir", str(resumed), *extra,
            "--per_device_train_batch_size", str(micro), "--gradient_accumulation_steps", str(ga),
            "--resume_from_checkpoint", str(checkpoint)]  # fmt: skip
    in_process("sft", args)  # one process: no launcher needed to resume
    ours, theirs = train_records(resumed), train_records(reference)
    assert [r["step"] for r in ours] == [5, 6]
    for a, b in zip(ours, theirs[4:], strict=True):
        assert a["lr"] == b["lr"] and a["loss"] == b["loss"]  # the same operations in the same order
    lora_resumed, lora_reference = adapter(resumed), adapter(reference)
    assert all(torch.equal(lora_resumed[k], lora_reference[k]) for k in lora_reference)


# -------------------------------------------------------------------- refusals, no launch needed
def test_architecture_without_a_default_needs_lora_target_modules():
    with pytest.raises(
        ConfigError, match=r"no default LoRA target modules for model type 'gpt2'.*set lora_target_modules"
    ):
        target_modules("gpt2", [])
    assert target_modules("gpt2", ["c_attn"]) == ["c_attn"]


def test_merge_adapter_without_use_peft_is_refused():
    cfg = SFTConfig(merge_adapter=True)
    with pytest.raises(ConfigError, match=r"merge_adapter: true needs use_peft: true"):
        apply_lora(torch.nn.Linear(2, 2), cfg, "causal-lm")


def test_target_module_that_the_model_lacks_is_a_config_error(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    cfg = SFTConfig(use_peft=True, lora_target_modules=["query"])
    with pytest.raises(ConfigError, match=r"LoRA cannot be applied: .*fix lora_target_modules"):
        apply_lora(model, cfg, "causal-lm")


def test_pipeline_recipe_refuses_lora_before_starting_processes(tiny_llama):
    from recipes.sft_pipeline import main as pipeline_main

    with pytest.raises(ConfigError, match=r"the pipeline recipe does not support LoRA yet"):
        pipeline_main(["--config", "recipes/configs/sft_pipeline_smollm2.yaml", "--model_name_or_path",
                       str(tiny_llama), "--use_peft", "true"])  # fmt: skip


def _path_env() -> dict:
    import os

    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)}


# -------------------------------------------------------------------- classification: LoRA + trained head
@pytest.fixture(scope="module")
def classify_run(tmp_path_factory):
    """50 train samples, micro 4 x GA 2 on 1 process: 13 batches, 7 optimizer steps in one epoch."""
    root = tmp_path_factory.mktemp("classify_lora")
    encoder = make_tiny_encoder(root / "encoder")
    data = write_uneven_splits(root / "data")
    lora_args = ["--use_peft", "true", "--lora_r", str(R), "--lora_alpha", str(ALPHA), "--lora_dropout", "0",
                 "--merge_adapter", "true", "--report_to", "none"]  # fmt: skip
    args = classify_args(encoder, data, root / "out", num_train_epochs=1) + lora_args
    in_process("classify", args)
    return root / "out", encoder, data, args


@pytest.mark.slow
def test_classify_lora_trains_adapters_and_the_new_head_and_leaves_the_encoder_frozen(classify_run):
    out, encoder, _, _ = classify_run
    base, saved = load_weights(encoder), adapter(out)
    # 2 layers x (query, key, value, attention output dense, intermediate dense, output dense) + pooler dense
    lora_stems = {k.rsplit(".lora_", 1)[0] for k in saved if ".lora_" in k}
    assert len(lora_stems) == 2 * 6 + 1
    assert {stem.rsplit(".", 1)[1] for stem in lora_stems} == {"query", "key", "value", "dense"}
    head = {k: v for k, v in saved.items() if ".lora_" not in k}
    assert set(head) == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert head["base_model.model.classifier.weight"].shape == (len(LABELS), 32)
    plan = load_plan(out)
    assert plan["trainable_parameters"] == sum(v.numel() for v in saved.values())
    head_size = sum(v.numel() for v in head.values())
    # The encoder, the head peft keeps as the frozen original, and the trained copy plus the adapters.
    assert (
        plan["total_parameters"]
        == sum(v.numel() for v in base.values()) + head_size + plan["trainable_parameters"]
    )


@pytest.mark.slow
def test_classify_merged_model_loads_as_a_plain_classifier_with_the_outputs_of_base_plus_adapter(
    classify_run,
):
    from peft import PeftModel

    out, encoder, data, _ = classify_run
    texts = [row["text"] for row in read_jsonl(data / "test.jsonl")[:6]]
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    batch = tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged", dtype=torch.float32).eval()
    assert merged.config.id2label == dict(enumerate(LABELS))
    base = AutoModelForSequenceClassification.from_pretrained(
        encoder, num_labels=len(LABELS), dtype=torch.float32
    )
    with_adapter = PeftModel.from_pretrained(base, out / "final").eval()
    with torch.no_grad():
        merged_logits, peft_logits = merged(**batch).logits, with_adapter(**batch).logits
    tolerance = merge_tolerance(base.config, batch["input_ids"], peft_logits)
    assert (merged_logits - peft_logits).abs().max() <= tolerance
    saved, merged_weights, base_weights = adapter(out), load_weights(out / "merged"), load_weights(encoder)
    assert torch.equal(merged_weights["classifier.weight"], saved["base_model.model.classifier.weight"])
    for key, value in base_weights.items():  # embeddings and LayerNorms carry no adapter: bit-identical
        if "embeddings" in key or "LayerNorm" in key:
            assert torch.equal(merged_weights[f"bert.{key}"], value), key


@pytest.mark.slow
def test_recipes_plan_for_classify_reports_the_parameter_counts_of_the_lora_run(classify_run, capsys):
    out, _, _, args = classify_run
    assert cli_main(["plan", "--recipe", "classify", "--json", *args]) == 0
    printed, plan = json.loads(capsys.readouterr().out), load_plan(out)
    assert (printed["trainable_parameters"], printed["total_parameters"]) == (
        plan["trainable_parameters"],
        plan["total_parameters"],
    )
