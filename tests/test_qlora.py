"""QLoRA (load_in_4bit + use_peft) and 8-bit optimizer states (optim: adamw_8bit) with real bitsandbytes on
CPU processes: what trains and what stays frozen, exactness where the topology must not change anything
(accumulation, DDP, resume, the same seed), the distance to unquantised LoRA, the merged model, and every
refused combination, refused by the doctor and at start-up with the same words.

The runs are the shared job (helpers.JOB: 12 steps of 8 samples, checkpoints every 4) with LoRA r 4 on the
tiny Llama, its 4-bit NF4 base quantised in blocks of 64 weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import (
    TWO_PROCESSES,
    adam_tolerance,
    eval_records,
    float32_tolerance,
    forward_terms,
    in_process,
    job_args,
    launch,
    load_plan,
    load_weights,
    read_jsonl,
    resume_copy,
    run_sums,
    step_loss_tolerance,
    train_records,
    weight_distance,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from recipes.core.config import ConfigError, parse_config
from recipes.core.doctor.diagnose import diagnose, preflight
from recipes.core.doctor.findings import DoctorError
from recipes.core.model.optimizer import make_optimizer
from recipes.core.model.pretrained import load_pretrained
from recipes.core.model.quantization import bits_and_bytes_config
from recipes.sft import SFTConfig

LORA = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0"]
Q4 = ["--load_in_4bit", "true"]
RUNS = {  # name: (accelerate config or None for this process, extra arguments)
    "q4": (None, [*LORA, *Q4, "--merge_adapter", "true"]),
    "q4_again": (None, [*LORA, *Q4, "--save_steps", "0"]),
    "q4_big_batch": (None, [*LORA, *Q4, "--per_device_train_batch_size", "8", "--save_steps", "0"]),
    "q4_checkpointed": (None, [*LORA, *Q4, "--gradient_checkpointing", "true", "--save_steps", "0"]),
    "q4_ddp": (TWO_PROCESSES, [*LORA, *Q4, "--save_steps", "0"]),
    "q4_zero2": ("accelerate_configs/ds_zero2.yaml", [*LORA, *Q4, "--save_steps", "0"]),
    "q4_zero3": ("accelerate_configs/ds_zero3.yaml", [*LORA, *Q4, "--save_steps", "0"]),
    # FSDP2 shards floating-point storage only: the 4-bit codes stored in float32 elements (the same bits)
    "q4_fsdp2": (
        "accelerate_configs/fsdp2.yaml",
        [*LORA, *Q4, "--bnb_4bit_quant_storage", "float32", "--save_steps", "0", "--merge_adapter", "true"],
    ),
    "lora": (None, [*LORA, "--save_steps", "0"]),
    "q8": (None, [*LORA, "--load_in_8bit", "true", "--save_steps", "0"]),
    "q8_big_batch": (
        None,
        [*LORA, "--load_in_8bit", "true", "--per_device_train_batch_size", "8", "--save_steps", "0"],
    ),
    "full_8bit_adam": (None, ["--optim", "adamw_8bit"]),
    "full_8bit_adam_ddp": (TWO_PROCESSES, ["--optim", "adamw_8bit"]),
}


class Runs:
    def __init__(self, model: Path, tmp_path_factory):
        self.model, self.tmp_path_factory, self.made = model, tmp_path_factory, {}

    def args(self, name: str, out: Path) -> list[str]:
        return job_args(self.model, out, *RUNS[name][1])

    def __getitem__(self, name: str) -> Path:
        if name not in self.made:
            out = self.tmp_path_factory.mktemp(name)
            accelerate_config, _ = RUNS[name]
            if accelerate_config is None:
                in_process("sft", self.args(name, out))
            else:
                launch(accelerate_config, "sft", self.args(name, out))
            self.made[name] = out
        return self.made[name]


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory) -> Runs:
    return Runs(tiny_llama, tmp_path_factory)


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


def assert_same_records(a: Path, b: Path) -> None:
    """Every loss, gradient norm, LR and eval loss equal, bit for bit."""
    keys = ("step", "loss", "grad_norm", "lr", "tokens", "eval_loss")
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [{k: r.get(k) for k in keys} for r in ra] == [{k: r.get(k) for k in keys} for r in rb]


def assert_one_big_batch(ours: Path, reference: Path) -> None:
    """The same sums as the reference, added in another order (as tests/test_lora.py holds plain LoRA)."""
    records, sums, big = train_records(reference), run_sums(reference), adapter(reference)
    n_weights = sum(t.numel() for t in big.values())
    assert [r["tokens"] for r in train_records(ours)] == [r["tokens"] for r in records]
    for a, b in zip(train_records(ours), records, strict=True):
        assert abs(a["loss"] - b["loss"]) <= step_loss_tolerance(b, records, sums, n_weights), (a, b)
    assert weight_distance(adapter(ours), big) <= adam_tolerance(
        sums.gradient, [r["lr"] for r in records], n_weights
    )


# -------------------------------------------------------------------- what trains, what stays frozen
@pytest.mark.slow
def test_qlora_trains_the_adapters_on_a_frozen_4bit_base_and_counts_its_parameters_as_unquantised(
    runs, tiny_llama
):
    run, plain = runs["q4"], runs["lora"]
    saved = adapter(run)
    assert len(saved) == 2 * 7 * 2  # 2 layers x 7 projections x (A, B)
    assert all(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # every adapter trained
    # The checkpoint holds the base as 4-bit NF4 blocks: half a byte per weight and a scale per 64 weights.
    state = load_file(str(run / "checkpoint-4" / "model.safetensors"))
    q_proj = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert (state[q_proj].dtype, state[q_proj].numel()) == (torch.uint8, 32 * 32 // 2)
    assert state[f"{q_proj}.absmax"].numel() == 32 * 32 // 64
    assert state[f"{q_proj}.quant_state.bitsandbytes__nf4"].dtype == torch.uint8
    # Parameters are counted as the values they hold: the same counts as the unquantised LoRA run.
    counts = ("trainable_parameters", "total_parameters")
    assert [load_plan(run)[k] for k in counts] == [load_plan(plain)[k] for k in counts]
    assert load_plan(run)["trainable_parameters"] == sum(v.numel() for v in saved.values())


def mapped(path: Path) -> bool:
    """Whether this process has `path` memory-mapped (Linux's /proc/self/maps)."""
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("bits", ["--load_in_4bit", "--load_in_8bit"])
def test_a_quantised_base_loaded_on_a_cpu_keeps_no_map_of_the_checkpoint(tiny_llama, bits):
    """Loaded as transformers loads it, the unquantised weights are views of the memory-mapped checkpoint,
    which keeps the map (and every page of it quantisation read) alive; the recipes' loading gives them
    memory of their own, with the same values, so the map goes."""
    checkpoint = tiny_llama / "model.safetensors"
    cfg = parse_config(SFTConfig, job_args(tiny_llama, tiny_llama / "unused", *LORA, bits, "true"))
    model = load_pretrained(AutoModelForCausalLM, cfg)
    assert not mapped(checkpoint)
    plain = load_file(str(checkpoint))
    kept = {k: v for k, v in model.state_dict().items() if v.dtype == torch.float32 and k in plain}
    assert "model.embed_tokens.weight" in kept and "model.norm.weight" in kept
    assert all(torch.equal(v, plain[k]) for k, v in kept.items())
    config = bits_and_bytes_config(cfg)
    direct = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, quantization_config=config)
    assert mapped(checkpoint)  # what the recipes undo
    del direct


# -------------------------------------------------------------------- exactness where it is exact
@pytest.mark.slow
def test_two_qlora_runs_with_the_same_seed_are_identical(runs):
    assert_same_records(runs["q4"], runs["q4_again"])
    a, b = adapter(runs["q4"]), adapter(runs["q4_again"])
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_qlora_resumed_from_a_checkpoint_continues_bit_for_bit(runs, tmp_path):
    """The base is quantised again from the pretrained model on resume (its constants in the checkpoint are
    not read back): quantisation is deterministic, so the resumed run repeats the same operations."""
    reference = runs["q4"]
    resumed = resume_copy(reference, 4, tmp_path / "resumed")
    in_process("sft", [*runs.args("q4", resumed), "--resume_from_checkpoint", str(resumed / "checkpoint-4")])
    assert_same_records(resumed, reference)
    a, b = adapter(resumed), adapter(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["q4", "q4_checkpointed", "q4_ddp", "q4_zero2", "q4_zero3", "q4_fsdp2"])
def test_qlora_accumulation_data_parallelism_and_checkpointing_equal_one_big_batch(runs, name):
    """Every run dequantises the same 4-bit blocks to the same fp32 weights, so accumulation (GA 4), two
    data-parallel processes (GA 2: DDP, ZeRO-2, ZeRO-3 partitioning the codes, FSDP2 sharding them in float32
    storage) and activation checkpointing train the big batch's sums in other orders, within the rounding
    tests/test_lora.py holds plain LoRA to."""
    assert_one_big_batch(runs[name], runs["q4_big_batch"])


@pytest.mark.slow
def test_8bit_lora_accumulation_equals_one_big_batch_on_a_frozen_int8_base(runs):
    """LLM.int8 quantises each row of a product's inputs on its own (and the frozen weights once), so a
    token's products do not depend on the other sequences of its micro-batch: accumulation (GA 4) trains
    the big batch's sums in another order."""
    assert_one_big_batch(runs["q8"], runs["q8_big_batch"])
    assert all(v.abs().max() > 0 for k, v in adapter(runs["q8"]).items() if "lora_B" in k)


# -------------------------------------------------------------------- against unquantised LoRA
NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32}
INT8 = {"load_in_8bit": True}


def logit_change_of_quantisation(model: Path, input_ids: torch.Tensor, quantisation: dict = NF4) -> float:
    """The largest change quantisation (NF4 by default) makes to a logit of the pretrained model on
    `input_ids`."""
    plain = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    config = BitsAndBytesConfig(**quantisation)
    quantised = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, quantization_config=config)
    quantised.train()  # the kernel training uses (core/model/quantization.py prepare_quantized)
    with torch.no_grad():
        return (plain(input_ids=input_ids).logits - quantised(input_ids=input_ids).logits).abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize(("name", "quantisation"), [("q4", NF4), ("q8", INT8)], ids=["nf4", "int8"])
def test_qlora_losses_stay_within_the_quantisation_bound_of_unquantised_lora(
    runs, tiny_llama, name, quantisation
):
    """A token's loss is the log-softmax of its logits, which moves by at most twice the largest change of a
    logit; quantisation changes the pretrained model's logits by delta, so before training (LoRA's B is 0)
    the losses lie within 2 delta. Each step then moves each run's adapters by at most about the LR per
    weight (Adam), so the two runs' adapters lie within 2 lr sqrt(n) per step of each other, which moves a
    loss by at most its gradient's norm times that (README, QLoRA)."""
    q, plain = train_records(runs[name]), train_records(runs["lora"])
    torch.manual_seed(0)
    input_ids = torch.randint(0, 400, (8, 96))
    delta = logit_change_of_quantisation(tiny_llama, input_ids, quantisation)
    n_weights = sum(v.numel() for v in adapter(runs["lora"]).values())
    gradient = max(r["grad_norm"] for r in q + plain)
    for a, b in zip(q, plain, strict=True):
        lrs = sum(r["lr"] for r in plain if r["step"] < b["step"])
        bound = 2 * delta + gradient * 2 * lrs * math.sqrt(n_weights)
        assert abs(a["loss"] - b["loss"]) <= bound, (a, b, bound)
    first_q, first_plain = eval_records(runs[name])[0], eval_records(runs["lora"])[0]
    assert abs(first_q["eval_loss"] - first_plain["eval_loss"]) <= 2 * delta
    assert delta > 1e-4  # quantisation did change the model: the bound is not one of rounding


# -------------------------------------------------------------------- merging
@pytest.mark.slow
@pytest.mark.parametrize("name", ["q4", "q4_fsdp2"])
def test_merged_model_equals_the_adapter_on_the_unquantised_base_and_differs_from_the_trained_model_by_quantisation(
    runs, tiny_llama, name
):
    """merged/ is the unquantised base in the compute dtype (fp32) plus the adapter: its logits equal the
    adapter on that base to rounding, and the adapter on the dequantised base (the model that trained) to
    the quantisation's own change of the logits, delta, which the adapter does not undo. After FSDP2
    training too, whose adapter was gathered from its shards before merging."""
    from peft import PeftModel

    run = runs[name]
    input_ids = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 250], [2, 8, 64, 128, 11, 13, 300, 4]])
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    assert merged.dtype == torch.float32 and not hasattr(merged.config, "quantization_config")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    on_plain = PeftModel.from_pretrained(base, run / "final").eval()
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    quantised = AutoModelForCausalLM.from_pretrained(
        tiny_llama, dtype=torch.float32, quantization_config=config
    )
    on_dequantised = PeftModel.from_pretrained(quantised, run / "final").train()  # training's kernel
    with torch.no_grad():
        merged_logits, plain_logits = merged(input_ids=input_ids).logits, on_plain(input_ids=input_ids).logits
        trained_logits = on_dequantised(input_ids=input_ids).logits
    # peft adds scale (x A) B where the merged weight holds W + scale B A: another order of the same sums,
    # 4 adapted products (R + 1 terms each) more per layer along the deepest chain.
    terms = forward_terms(merged.config, input_ids.shape[1]) + 4 * 5 * merged.config.num_hidden_layers
    assert (merged_logits - plain_logits).abs().max() <= float32_tolerance(
        terms, plain_logits.abs().max().item()
    )
    delta = logit_change_of_quantisation(tiny_llama, input_ids)
    # To first order the trained model's logits move by what the weights' quantisation error does to them.
    # The adapted weights are W + s B A, so along the deepest chain each of the 4 adapted products per layer
    # can scale that change by at most 1 + g, g the adapter's largest entry relative to its base weight's.
    lora, base_weights = adapter(run), load_weights(tiny_llama)
    growth = max(
        (2 * lora[k.replace("lora_A", "lora_B")] @ v).abs().max().item()  # s = lora_alpha / r = 2
        / base_weights[k.removeprefix("base_model.model.").replace(".lora_A", "")].abs().max().item()
        for k, v in lora.items()
        if "lora_A" in k
    )
    bound = delta * (1 + growth) ** (4 * merged.config.num_hidden_layers)
    bound += float32_tolerance(2 * terms, trained_logits.abs().max().item())  # delta's own two forwards
    assert (merged_logits - trained_logits).abs().max() <= bound


# -------------------------------------------------------------------- 8-bit optimizer states
@pytest.mark.slow
def test_adamw_8bit_trains_every_weight_with_8bit_states_for_large_tensors_and_resumes_bit_for_bit(
    runs, tmp_path
):
    run = runs["full_8bit_adam"]
    assert [r["step"] for r in train_records(run)] == list(range(1, 13))
    optimizer = torch.load(run / "checkpoint-4" / "optimizer.bin", weights_only=True)
    states = [s["__bnb_optimizer_quant_state__"] for s in optimizer["state"].values()]
    # The embedding and LM head (400 x 32 = 12,800 values) keep 8-bit states, block-wise scaled per 256;
    # the 32 x 32 projections (1,024 values, under bitsandbytes' 4,096) keep 32-bit ones.
    big = [s for s in states if s["state1"].numel() == 400 * 32]
    small = [s for s in states if s["state1"].numel() == 32 * 32]
    assert big and all(s["state1"].dtype == s["state2"].dtype == torch.uint8 for s in big)
    assert all(s["absmax1"].numel() == 400 * 32 // 256 for s in big)
    assert small and all(s["state1"].dtype == torch.float32 for s in small)
    resumed = resume_copy(run, 4, tmp_path / "resumed")
    in_process(
        "sft",
        [*runs.args("full_8bit_adam", resumed), "--resume_from_checkpoint", str(resumed / "checkpoint-4")],
    )
    assert_same_records(resumed, run)
    a, b = (load_file(str(r / "final" / "model.safetensors")) for r in (resumed, run))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_adamw_8bit_on_two_ddp_processes_keeps_the_states_and_losses_of_one_process(runs):
    """DDP hands each rank's optimizer the same all-reduced gradient, the one-process gradient summed in
    another order, so the 8-bit states hold the same codes: quantisation maps a value within rounding of the
    other run's to the same code or, across a code boundary, to its neighbour; each block's scale (its
    largest magnitude) differs by rounding only. A rare neighbouring code moves one weight's update by a
    fraction of the LR, far inside the rounding bounds the losses and weights are held to."""
    one, ddp = runs["full_8bit_adam"], runs["full_8bit_adam_ddp"]
    records, sums = train_records(one), run_sums(one)
    weights_one, weights_ddp = load_weights(one / "final"), load_weights(ddp / "final")
    n_weights = sum(t.numel() for t in weights_one.values())
    assert [r["tokens"] for r in train_records(ddp)] == [r["tokens"] for r in records]
    for a, b in zip(train_records(ddp), records, strict=True):
        assert abs(a["loss"] - b["loss"]) <= step_loss_tolerance(b, records, sums, n_weights), (a, b)
    assert weight_distance(weights_ddp, weights_one) <= adam_tolerance(
        sums.gradient, [r["lr"] for r in records], n_weights
    )
    for step in (4, 8):
        states = [
            torch.load(run / f"checkpoint-{step}" / "optimizer.bin", weights_only=True)["state"]
            for run in (one, ddp)
        ]
        assert states[0].keys() == states[1].keys()
        big = [
            k
            for k, s in states[0].items()
            if s["__bnb_optimizer_quant_state__"]["state1"].numel() == 400 * 32
        ]
        assert len(big) == 2  # the embedding and the LM head; the rest keep 32-bit states (see above)
        for k in big:
            a, b = (s[k]["__bnb_optimizer_quant_state__"] for s in states)
            for codes, scale, power in (("state1", "absmax1", 1), ("state2", "absmax2", 2)):
                assert a[codes].dtype == b[codes].dtype == torch.uint8
                assert (a[codes].int() - b[codes].int()).abs().max() <= 1
                # a block's scale is its largest state, a running mean of gradients (squared, for the
                # second state, which doubles their relative rounding)
                gap = (a[scale] - b[scale]).abs()
                assert (gap <= power * float32_tolerance(sums.gradient, 1.0) * a[scale]).all(), gap.max()


def test_bitsandbytes_optimizers_are_built_under_their_trainingarguments_names():
    import bitsandbytes as bnb

    model = torch.nn.Linear(128, 64)
    for name, cls in [("adamw_bnb_8bit", bnb.optim.AdamW8bit), ("adamw_8bit", bnb.optim.AdamW8bit),
                      ("paged_adamw_8bit", bnb.optim.PagedAdamW8bit), ("paged_adamw_32bit", bnb.optim.PagedAdamW32bit),
                      ("adamw_torch", torch.optim.AdamW)]:  # fmt: skip
        assert type(make_optimizer(model, SFTConfig(optim=name))) is cls, name
    with pytest.raises(
        ConfigError, match=r"optim 'adamw_anyprecision' is not supported; use one of adamw_torch_fused"
    ):
        make_optimizer(model, SFTConfig(optim="adamw_anyprecision"))


# -------------------------------------------------------------------- refusals: doctor and start-up alike
def recipe_file(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))
    return path


def doctor(recipe: Path, accelerate_config: str | None = None) -> list[tuple[str, str]]:
    defaults = {f: getattr(SFTConfig(), f) for f in SFTConfig.__dataclass_fields__}
    found = diagnose(accelerate_config, None, str(recipe), set(defaults), defaults)
    return [(f.key, f.problem) for f in found]


REFUSALS = {  # name: (recipe fields, accelerate config, key, words of the problem)
    "full_finetuning": ({"load_in_4bit": "true"}, None, "use_peft", "full fine-tuning of a quantised base"),
    "both_widths": ({"load_in_4bit": "true", "load_in_8bit": "true", "use_peft": "true"}, None, "load_in_8bit",
                    "load_in_4bit and load_in_8bit are both true"),
    "quant_type": ({"load_in_4bit": "true", "use_peft": "true", "bnb_4bit_quant_type": "int4"}, None,
                   "bnb_4bit_quant_type", "'int4' is not a 4-bit data type"),
    "8bit_adam_zero2": ({"optim": "adamw_8bit"}, "accelerate_configs/ds_zero2.yaml", "optim",
                        "adamw_8bit under DeepSpeed"),
    "8bit_adam_fsdp2": ({"optim": "paged_adamw_8bit"}, "accelerate_configs/fsdp2.yaml", "optim",
                        "paged_adamw_8bit under FSDP2"),
    "uint8_storage_fsdp2": ({"load_in_4bit": "true", "use_peft": "true"}, "accelerate_configs/fsdp2.yaml",
                            "bnb_4bit_quant_storage", "4-bit weights stored as uint8 under FSDP2"),
    "8bit_base_fsdp2": ({"load_in_8bit": "true", "use_peft": "true"}, "accelerate_configs/fsdp2.yaml",
                        "load_in_8bit", "an 8-bit base under FSDP2"),
    "float_storage_zero_bf16": ({"load_in_4bit": "true", "use_peft": "true", "mixed_precision": "bf16",
                                 "bnb_4bit_quant_storage": "float32"}, "accelerate_configs/ds_zero2.yaml",
                                "bnb_4bit_quant_storage", "float32 storage of 4-bit weights under DeepSpeed bf16"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_the_doctor_refuses_each_unsupported_combination_with_its_reason(tmp_path, name):
    fields, accelerate_config, key, words = REFUSALS[name]
    found = doctor(recipe_file(tmp_path, **fields), accelerate_config)
    assert [problem for k, problem in found if k == key and problem.startswith(words)], found


def test_a_recipe_stops_at_start_up_on_a_quantised_base_without_lora_in_the_doctors_words(tmp_path):
    cfg = SFTConfig(load_in_4bit=True)
    with pytest.raises(DoctorError) as stopped:
        preflight(cfg, 1, env={})
    [(_, key, problem, fix)] = stopped.value.found
    assert (key, problem) == next(
        (k, p) for k, p in doctor(recipe_file(tmp_path, load_in_4bit="true")) if k == key
    )
    assert fix.startswith("set use_peft: true (QLoRA")


def test_the_pipeline_recipe_refuses_a_quantised_base(tmp_path):
    from recipes.sft_pipeline import SFTPipelineConfig

    cfg = SFTPipelineConfig(load_in_4bit=True, deepspeed_config="ds_configs/pipeline.json")
    with pytest.raises(
        DoctorError, match=r"load_in_4bit: the pipeline recipe builds its stages from the plain"
    ):
        preflight(cfg, 2, env={})


@pytest.mark.slow
def test_classify_qlora_keeps_the_new_head_unquantised_and_restores_its_best_model(
    encoder, news_data, tmp_path
):
    """The head the checkpoint lacks is left out of quantisation (it trains in full), and keeping the best
    evaluation's weights loads them back into the quantised model."""
    from helpers import classify_args

    out = tmp_path / "out"
    args = classify_args(encoder, news_data, out, num_train_epochs=1, metric_for_best_model="loss")
    in_process("classify", [*args, *LORA, *Q4, "--report_to", "none"])
    saved = adapter(out)
    assert saved["base_model.model.classifier.weight"].dtype == torch.float32
    assert any(".lora_B" in k and v.abs().max() > 0 for k, v in saved.items())
    assert [r["step"] for r in train_records(out)] == list(
        range(1, load_plan(out)["total_optimizer_steps"] + 1)
    )
