"""Plan estimates (parameters, FLOPs, wall clock, ZeRO memory, activations) against hand arithmetic."""

import dataclasses
import json
import time

import pytest
from helpers import FLOAT64_UNIT_ROUNDOFF
from transformers import AutoConfig

from recipes.cli import main
from recipes.core.model.shape import model_shape
from recipes.core.plan.activations import Levers, activation_bytes
from recipes.core.plan.estimate import estimate_run, estimate_table
from recipes.core.plan.flops import training_flops
from recipes.core.plan.hardware import DEVICES, Device, get_device
from recipes.core.plan.memory import device_memory
from recipes.core.plan.model_shape import ModelShape
from recipes.core.plan.model_states import (
    Quantization,
    ZeroLayout,
    model_state_bytes,
    zero3_gathered_bytes,
    zero_working_bytes,
)
from recipes.core.plan.steps import make_plan
from recipes.core.plan.wall_clock import wall_clock_seconds
from recipes.core.plan.workload import MicroBatch, Workload

V = 1000  # vocabulary of the small config below


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """Only a config.json: the estimate must not need (or build) weights."""
    directory = tmp_path_factory.mktemp("small_llama")
    AutoConfig.for_model(
        "llama",
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ).save_pretrained(directory)
    return directory


# Per layer: q 32x32 + k 32x16 + v 32x16 + o 32x32 = 3072; gate/up/down 3 x 32x64 = 6144; two norms 2 x 32.
PER_LAYER = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32
NON_EMBEDDING = 2 * PER_LAYER + 32  # + final norm = 18,592
TOTAL = NON_EMBEDDING + 2 * V * 32  # + input embeddings + untied LM head = 82,592


def test_parameter_counts_come_from_the_config_alone(small_llama):
    shape = model_shape(str(small_llama))
    assert (shape.total_params, shape.non_embedding_params) == (TOTAL, NON_EMBEDDING) == (82_592, 18_592)
    assert (shape.num_layers, shape.hidden_size, shape.num_heads, shape.attention_dim) == (2, 32, 4, 32)


def test_a_70b_model_is_counted_in_seconds_without_weights(tmp_path):
    AutoConfig.for_model(
        "llama",
        vocab_size=128_256,
        hidden_size=8192,
        intermediate_size=28_672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ).save_pretrained(tmp_path)
    started = time.perf_counter()
    shape = model_shape(str(tmp_path))
    assert time.perf_counter() - started < 60
    per_layer = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28_672 + 2 * 8192
    assert shape.non_embedding_params == 80 * per_layer + 8192 == 68_452_360_192
    assert shape.total_params == 68_452_360_192 + 2 * 128_256 * 8192 == 70_553_706_496


def test_training_flops_are_6_n_d_plus_the_attention_term(small_llama):
    shape = model_shape(str(small_llama))
    tokens, seq = 7168, 64
    # 6 x 18,592 x 7,168 = 799,604,736; 12 x 2 layers x 32 x 64 x 7,168 = 352,321,536
    assert training_flops(shape, tokens, seq) == 799_604_736 + 352_321_536


def test_zero_stages_partition_states_as_in_the_zero_paper():
    n, dp = 1000, 4
    # bf16 Adam: 2 + 2 + 12 bytes per parameter
    assert model_state_bytes(n, ZeroLayout(0, dp), "bf16") == (2000, 2000, 12000, 0)
    assert model_state_bytes(n, ZeroLayout(1, dp), "bf16") == (2000, 2000, 3000, 0)
    assert model_state_bytes(n, ZeroLayout(2, dp), "bf16") == (2000, 500, 3000, 0)
    assert model_state_bytes(n, ZeroLayout(3, dp), "bf16") == (500, 500, 3000, 0)
    # fp32: 4 + 4 + 8, and under ZeRO 4 more for the fp32 copy of each partition the optimizer steps on
    assert model_state_bytes(n, ZeroLayout(0, dp), "fp32") == (4000, 4000, 8000, 0)
    assert model_state_bytes(n, ZeroLayout(1, dp), "fp32") == (4000, 4000, 3000, 0)
    assert model_state_bytes(n, ZeroLayout(3, dp), "fp32") == (1000, 1000, 3000, 0)


def test_zero3_gathers_two_layers_or_the_embedding_whichever_is_larger():
    # 4 layers of 1,000 parameters; a 100 x 8 embedding (800) is smaller than two layers (2,000)
    shape = ModelShape(4800, 800, num_layers=4, hidden_size=8, num_heads=2, attention_dim=8, vocab_size=100)
    assert zero3_gathered_bytes(shape, "fp32") == 4 * 2000
    assert zero3_gathered_bytes(shape, "bf16") == 2 * 2000
    wide = dataclasses.replace(shape, vocab_size=1000)  # an 8,000-parameter embedding is gathered alone
    assert zero3_gathered_bytes(wide, "bf16") == 2 * 8000
    # per device on 4 processes: its partition of the parameters and what is gathered
    zero3 = device_memory(shape, MicroBatch(1, 16), "fp32", ZeroLayout(3, data_parallel_size=4))
    assert zero3.parameters == 4 * 4800 / 4 + 4 * 2000


def test_zero_holds_whole_gradients_of_its_largest_unit_next_to_the_partitions():
    # 4 layers of 1,000 parameters; a 100 x 8 embedding (800 parameters)
    shape = ModelShape(4800, 800, num_layers=4, hidden_size=8, num_heads=2, attention_dim=8, vocab_size=100)
    # ZeRO-3: two gathered layers; one layer's whole gradient before its reduce-scatter
    assert zero_working_bytes(shape, ZeroLayout(3), "bf16") == (2 * 2000, 2 * 1000, 0)
    # ZeRO-1/2: the embedding's whole gradient; offloading, a staging buffer of it on each side
    assert zero_working_bytes(shape, ZeroLayout(2), "fp32") == (0, 4 * 800, 0)
    assert zero_working_bytes(shape, ZeroLayout(1, offload_optimizer="cpu"), "fp32") == (
        0,
        2 * 4 * 800,
        4 * 800,
    )
    assert zero_working_bytes(shape, ZeroLayout(0), "fp32") == (0, 0, 0)
    zero2 = device_memory(shape, MicroBatch(1, 16), "fp32", ZeroLayout(2, data_parallel_size=4))
    # fp32 under ZeRO: Adam's 8 bytes and the fp32 copy's 4, partitioned
    expected = (4 * 4800, 4 * 4800 / 4 + 4 * 800, 12 * 4800 / 4)
    assert (zero2.parameters, zero2.gradients, zero2.optimizer_states) == expected
    # LoRA (40 trainable): no whole gradients of frozen tensors; the gathered parameters stay
    lora = device_memory(
        shape, MicroBatch(1, 16), "fp32", ZeroLayout(3, data_parallel_size=4), trainable_params=40
    )
    assert (lora.parameters, lora.gradients) == (4 * 4800 / 4 + 4 * 2000, 4 * 40 / 4)


def test_frozen_parameters_have_no_gradients_or_optimizer_states():
    # LoRA: 1,000 parameters held, 40 of them trained; bf16 2 bytes per weight, 2 + 12 per trained one.
    assert model_state_bytes(1000, ZeroLayout(0, 4), "bf16", trainable_params=40) == (2000, 80, 480, 0)
    assert model_state_bytes(1000, ZeroLayout(3, 4), "bf16", trainable_params=40) == (500, 20, 120, 0)


def test_offloaded_states_leave_the_device():
    # ZeRO-2 + optimizer offload: 3,000 bytes of optimizer states per rank go to the host
    assert model_state_bytes(1000, ZeroLayout(2, 4, offload_optimizer="cpu"), "bf16") == (2000, 500, 0, 3000)
    # ZeRO-3 + parameter and optimizer offload: 500 + 3,000 bytes per rank on the host
    assert model_state_bytes(
        1000, ZeroLayout(3, 4, offload_optimizer="cpu", offload_param="cpu"), "bf16"
    ) == (0, 500, 0, 3500)
    # parameter offload exists only for ZeRO-3
    assert model_state_bytes(1000, ZeroLayout(2, 4, offload_param="cpu"), "bf16") == (2000, 500, 3000, 0)


def test_autocast_keeps_fp32_states_and_a_16_bit_copy_of_the_weights():
    # without DeepSpeed, bf16 is autocast: fp32 weights (4) and their cached bf16 copies (2), fp32
    # gradients (4) and Adam states (8); DeepSpeed's bf16 keeps 2 + 2 + 12
    assert model_state_bytes(1000, ZeroLayout(), "bf16", autocast=True) == (6000, 4000, 8000, 0)
    assert model_state_bytes(1000, ZeroLayout(), "bf16") == (2000, 2000, 12000, 0)
    assert model_state_bytes(1000, ZeroLayout(), "fp32", autocast=True) == (4000, 4000, 8000, 0)


def test_activation_estimate_follows_the_stated_formula(small_llama):
    shape = model_shape(str(small_llama))
    # per layer s b h (34 + 5 a s / h) = 64 x 4 x 32 x (34 + 5 x 4 x 64 / 32) = 8,192 x 74 = 606,208 (16-bit)
    # 2 layers = 1,212,416; fp32 logits and their gradient 8 s b V = 8 x 64 x 4 x 1,000 = 2,048,000
    assert activation_bytes(shape, 4, 64, "bf16") == 1_212_416 + 2_048_000
    assert activation_bytes(shape, 4, 64, "fp32") == 2 * 1_212_416 + 2_048_000


def test_activation_estimate_counts_checkpointing_and_the_chunked_loss(small_llama):
    shape = model_shape(str(small_llama))
    # checkpointed: each layer's 16-bit input 2 s b h = 2 x 64 x 4 x 32 = 16,384 per layer, 2 layers, plus
    # one layer recomputed (606,208); chunks of 100 tokens: 8 x 100 x 1,000 = 800,000 for the logits
    levers = Levers(gradient_checkpointing=True, loss_chunk_tokens=100)
    assert activation_bytes(shape, 4, 64, "bf16", levers) == 2 * 16_384 + 606_208 + 800_000
    assert activation_bytes(shape, 4, 64, "fp32", levers) == 2 * (2 * 16_384 + 606_208) + 800_000
    # a chunk larger than the micro-batch's s b = 256 tokens holds them all
    assert activation_bytes(shape, 4, 64, "bf16", Levers(loss_chunk_tokens=1024)) == 1_212_416 + 2_048_000
    assert levers.describe() == "activation checkpointing, chunked loss (100 tokens)"
    assert Levers().describe() == "none"


def test_wall_clock_divides_flops_by_devices_peak_and_utilisation():
    h100 = get_device("h100-sxm")
    assert h100.peak_flops["bf16"] == 989.5e12
    # one rounded product and one rounded quotient (the other factors are exact): within 2 u of 3600
    assert wall_clock_seconds(989.5e12 * 3600, 2, h100.peak_flops["bf16"], 0.5) == pytest.approx(
        3600, rel=2 * FLOAT64_UNIT_ROUNDOFF, abs=0
    )
    with pytest.raises(ValueError, match="utilization must be in"):
        wall_clock_seconds(1.0, 1, 1.0, 1.5)


def test_accelerator_table_lists_memory_and_dense_peaks():
    for name in (
        "H100-SXM",
        "H100-PCIe",
        "H200",
        "A100-40GB",
        "A100-80GB",
        "L40S",
        "A10G",
        "RTX-4090",
        "CPU",
    ):
        assert name in DEVICES
    assert get_device("A100-80GB").memory_bytes == 80e9
    assert get_device("A100-40GB").peak_flops["bf16"] == 312e12  # dense; 624 is the sparsity figure
    assert not get_device("V100-32GB").supports("bf16")
    with pytest.raises(ValueError, match="did you mean 'H100-SXM'"):
        get_device("H100-SMX")


def test_estimate_warns_when_the_model_states_do_not_fit(small_llama):
    shape = model_shape(str(small_llama))
    plan = make_plan(
        num_samples=100, world_size=2, micro_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-4
    ).to_dict()
    tiny_gpu = Device("tiny", 2_000_000, {"bf16": 1e12})
    est = estimate_run(plan, shape, "bf16", 64, zero_stage=0, device=tiny_gpu)
    # 16 x 82,592 = 1,321,472 bytes of model states + 3,260,416 of activations = 4,581,888 > 2,000,000
    assert est["memory_per_device"]["total"] == 1_321_472 + 3_260_416
    assert est["fits"] is False and est["warning"].startswith("does not fit: needs 0.0 GB per device")
    assert "a higher ZeRO stage (now 0)" in est["warning"]


def test_plan_cli_reads_topology_and_prints_hand_computed_estimate(small_llama, tmp_path, capsys):
    recipe = tmp_path / "sft_small.yaml"
    recipe.write_text(
        f"model_name_or_path: {small_llama}\nper_device_train_batch_size: 4\n"
        "gradient_accumulation_steps: 2\nmixed_precision: bf16\nmax_seq_length: 64\n"
    )
    ds = tmp_path / "zero2.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}))
    acc = tmp_path / "ds.yaml"
    acc.write_text(
        f"distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  deepspeed_config_file: {ds}\n"
    )
    argv = [
        "plan",
        "--config",
        str(recipe),
        "--num-samples",
        "100",
        "--accelerate-config",
        str(acc),
        "--gpu",
        "H100-SXM",
        "--utilization",
        "0.5",
        "--json",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    est = result["estimate"]
    # 100 samples / micro 4 = 25 batches -> 13 per rank (2 ranks) -> ceil(13 / 2) = 7 optimizer steps
    assert (result["world_size"], result["total_optimizer_steps"], result["samples_per_step"]) == (2, 7, 16)
    # processed tokens: 16 samples x 7 steps x 64 tokens = 7,168
    assert est["processed_tokens"] == 7168
    assert est["training_flops"] == 799_604_736 + 352_321_536
    # each side one rounded quotient of exact numbers: within u of the exact value, 2 u of each other
    assert est["wall_clock_seconds"] == pytest.approx(
        (799_604_736 + 352_321_536) / (2 * 989.5e12 * 0.5), rel=2 * FLOAT64_UNIT_ROUNDOFF, abs=0
    )
    # ZeRO-2 on 2 ranks, bf16: params 2 x 82,592; grads 2 x 82,592 / 2 and the 1,000 x 32 embedding's
    # whole bf16 gradient outside the reduce bucket; optimizer 12 x 82,592 / 2
    mem = est["memory_per_device"]
    grads = 82_592 + 2 * 32_000
    assert (mem["parameters"], mem["gradients"], mem["optimizer_states"]) == (165_184, grads, 495_552)
    # the recipe's chunks of 256 tokens hold all 64 x 4 tokens of a micro-batch: 8 x 256 x 1,000
    assert mem["activations"] == 1_212_416 + 2_048_000
    assert est["memory_levers"] == "chunked loss (256 tokens)"
    assert est["zero_stage"] == 2 and est["fits"] is True
    assert "6 x non-embedding params x tokens" in est["flops_formula"]


def test_encoder_is_counted_without_an_lm_head_and_without_logits(tmp_path):
    config = AutoConfig.for_model(
        "bert",
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        type_vocab_size=2,
    )
    config.architectures = ["BertModel"]
    config.save_pretrained(tmp_path)
    shape = model_shape(str(tmp_path))
    # embeddings: words 1000x32 + positions 64x32 + token types 2x32 = 34,112 (+ their LayerNorm 64)
    # per layer: q, k, v, o 4 x (32x32 + 32) + LayerNorm 64 + 32x64 + 64 + 64x32 + 32 + LayerNorm 64 = 8,544
    # pooler 32x32 + 32 = 1,056
    assert shape.embedding_params == 34_112
    assert shape.total_params == 34_112 + 64 + 2 * 8_544 + 1_056 == 52_320
    assert not shape.has_lm_head
    # 2 layers x 64 x 4 x 32 x (34 + 5 x 4 x 64 / 32) = 1,212,416 and no vocabulary-sized logits
    assert activation_bytes(shape, 4, 64, "bf16") == 1_212_416


def test_pipeline_stages_split_the_model_states():
    small = ModelShape(
        total_params=1000,
        embedding_params=0,
        num_layers=2,
        hidden_size=32,
        num_heads=4,
        attention_dim=32,
        vocab_size=V,
    )
    one = device_memory(small, MicroBatch(4, 64), "fp32")
    two = device_memory(small, MicroBatch(4, 64), "fp32", ZeroLayout(pipeline_stages=2))
    assert (one.parameters, one.gradients, one.optimizer_states) == (4000, 4000, 8000)
    assert (two.parameters, two.gradients, two.optimizer_states) == (2000, 2000, 4000)
    assert two.activations == one.activations


def adapter_plan(shape: ModelShape) -> dict:
    """The plan of a run on 2 processes that trains 1,000 adapter weights."""
    return make_plan(
        num_samples=100,
        world_size=2,
        micro_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-4,
        trainable_parameters=1_000,
        total_parameters=shape.total_params,
    ).to_dict()


def test_plan_of_a_lora_run_counts_states_for_the_adapters_only(small_llama):
    shape = model_shape(str(small_llama))
    plan = adapter_plan(shape)
    memory = estimate_run(plan, shape, "fp32", 64, zero_stage=0)["memory_per_device"]
    # fp32: 4 bytes for every weight held, 4 (gradient) + 8 (Adam) for each of the 1,000 trained ones.
    assert (memory["parameters"], memory["gradients"], memory["optimizer_states"]) == (
        4 * shape.total_params,
        4_000,
        8_000,
    )


def test_preference_tuning_counts_two_sequences_per_pair_and_the_reference_model(small_llama):
    shape = model_shape(str(small_llama))
    plan = make_plan(
        num_samples=100, world_size=2, micro_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-4
    ).to_dict()
    pairs = plan["samples_per_step"] * plan["total_optimizer_steps"]  # 16 pairs x 7 steps
    assert pairs == 112
    trained = 2 * pairs * 64  # chosen and rejected, 64 tokens each
    one_pass = training_flops(shape, trained, 64)
    runs = {
        reference: estimate_run(plan, shape, "fp32", 64, zero_stage=0, workload=Workload(2, reference))
        for reference in ("copy", "adapter", "precomputed")
    }
    for est in runs.values():
        assert est["processed_tokens"] == trained
        # a micro-batch of 4 pairs is 8 sequences
        assert est["memory_per_device"]["activations"] == activation_bytes(shape, 8, 64, "fp32")
    # the reference's forward, a third of forward + backward, over every trained token (copy, adapter) or
    # once over the 100 training pairs (precomputed)
    assert runs["copy"]["training_flops"] == runs["adapter"]["training_flops"] == one_pass + one_pass / 3
    assert runs["precomputed"]["reference_forward_tokens"] == 100 * 2 * 64
    assert runs["precomputed"]["training_flops"] == one_pass + training_flops(shape, 100 * 2 * 64, 64) / 3
    # only a frozen copy holds parameters of its own: fp32 4 bytes each, partitioned under ZeRO-3
    assert runs["copy"]["memory_per_device"]["reference"] == 4 * TOTAL
    assert runs["adapter"]["memory_per_device"]["reference"] == 0
    assert runs["precomputed"]["memory_per_device"]["reference"] == 0
    zero3 = estimate_run(plan, shape, "bf16", 64, zero_stage=3, workload=Workload(2, "copy"))
    assert zero3["memory_per_device"]["reference"] == 2 * TOTAL / 2
    assert "reference model" in estimate_table(runs["copy"])


def test_a_4bit_base_takes_the_bytes_bitsandbytes_stores(tmp_path):
    """Each 4-bit weight: half a byte of codes and its block's scale (an fp32, or with double quantisation a
    byte plus an fp32 per 256 blocks, which a tensor of fewer blocks still has one of)."""
    import bitsandbytes as bnb
    from helpers import make_tiny_decoder
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model_dir = make_tiny_decoder(tmp_path / "model", "llama")
    for double_quant in (False, True):
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=double_quant)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config)
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(layers) == 7 * model.config.num_hidden_layers  # every projection, not the LM head
        for layer in layers:
            state = layer.weight.quant_state
            stored = layer.weight.numel() * layer.weight.element_size() + state.absmax.nbytes
            stored += state.state2.absmax.nbytes if double_quant else 0
            planned = (
                Quantization(4, double_quant).bytes_per_weight(model.config.hidden_size) * state.shape.numel()
            )
            assert planned <= stored <= planned + (4 if double_quant else 0), (layer, stored, planned)


def test_plan_of_a_qlora_run_counts_the_quantised_base_and_8bit_adam_states(small_llama, tmp_path, capsys):
    shape = model_shape(str(small_llama))
    plan = adapter_plan(shape)
    estimate = estimate_run(plan, shape, "fp32", 64, quantization=Quantization(4), eight_bit_states=True)
    memory = estimate["memory_per_device"]
    # Embeddings and LM head fp32; decoder layers 0.5 + 4/64 bytes a weight, plus one layer dequantised in
    # fp32; the 1,000 adapter weights: a 4-byte gradient, 1 + 1 bytes of Adam states and a 4-byte scale per
    # 256 values of each state.
    quantized = 4 * (TOTAL - NON_EMBEDDING) + (0.5 + 4 / 64) * NON_EMBEDDING + 4 * NON_EMBEDDING / 2
    assert (memory["parameters"], memory["gradients"], memory["optimizer_states"]) == (
        quantized,
        4_000,
        2 * (1 + 4 / 256) * 1_000,
    )
    assert (estimate["quantization"], estimate["optimizer_states"]) == ("4-bit", "8-bit")
    assert "quantised base: decoder-layer linear weights 0.5 byte" in estimate["memory_formula"]
    # ZeRO-3 partitions the quantised weights as it does plain ones.
    zero3 = estimate_run(plan, shape, "fp32", 64, zero_stage=3, quantization=Quantization(4))
    partitioned = (4 * (TOTAL - NON_EMBEDDING) + (0.5 + 4 / 64) * NON_EMBEDDING) / 2
    gathered = zero3_gathered_bytes(shape, "fp32")
    assert zero3["memory_per_device"]["parameters"] == partitioned + gathered + 4 * NON_EMBEDDING / 2

    # `recipes plan` reads both from the recipe config.
    args = ["plan", "--config", "recipes/configs/sft_smollm2.yaml", "--model_name_or_path", str(small_llama)]
    args += ["--num-samples", "100", "--json", "--use_peft", "true", "--load_in_4bit", "true"]
    assert main([*args, "--optim", "adamw_8bit", "--mixed_precision", "no"]) == 0
    printed = json.loads(capsys.readouterr().out)["estimate"]
    assert (printed["quantization"], printed["optimizer_states"]) == ("4-bit", "8-bit")
