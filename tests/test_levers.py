"""The memory and speed levers, each exact where the arithmetic says it must be: the chunked loss and
activation checkpointing give the losses and weights of the plain run; bf16 keeps fp32 master weights and
optimizer states, the plan's steps and LRs exactly, and losses within bf16's precision; the attention
kernel and compilation are what the config asks for.

Runs are the shared tiny job (helpers.JOB); its references use the chunked loss, the default. The job's
micro-batches hold fewer target tokens than the default chunk, so whole runs exercise one chunk per
micro-batch; several chunks are proven on the loss and every gradient directly, and on a run with tiny
chunks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import (
    BF16_UNIT_ROUNDOFF,
    JOB_STEPS,
    SFT_DATA,
    TWO_PROCESSES,
    adam_tolerance,
    bf16_loss_tolerance,
    eval_loss_tolerance,
    eval_records,
    float32_tolerance,
    forward_terms,
    in_process,
    launch,
    load_plan,
    load_weights,
    make_tiny_decoder,
    read_jsonl,
    run_sums,
    step_loss_tolerance,
    train_records,
    weight_distance,
)
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from recipes.core.config import ConfigError, parse_config
from recipes.core.data.chat import IGNORE_INDEX, PackedCollator, PadCollator, causal_lm_inputs
from recipes.core.losses.causal_lm import CausalLMLoss
from recipes.core.model.pretrained import check_attention
from recipes.sft import SFTConfig, load_data

FULL_LOGITS = ["--loss_chunk_tokens", "0"]
CHECKPOINTING = ["--gradient_checkpointing", "true"]
BF16 = ["--mixed_precision", "bf16"]


def batch_of(model_dir: Path, size: int = 4) -> dict[str, torch.Tensor]:
    """`size` bundled chat samples, tokenised and padded as the recipe does."""
    cfg = parse_config(SFTConfig, ["--dataset_name", str(SFT_DATA), "--max_seq_length", "96"])
    train_set, _, _ = load_data(cfg, AutoTokenizer.from_pretrained(model_dir))
    return PadCollator(0)([train_set[i] for i in range(size)])


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> Path:
    """Tied input and output embeddings: the head's weight is the embedding's."""
    return make_tiny_decoder(tmp_path_factory.mktemp("qwen2"), "qwen2")


# -------------------------------------------------------------------- the chunked loss
@pytest.mark.parametrize("family", ["llama", "qwen2", "llama_lora"])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 64])
def test_chunked_loss_gives_the_full_logits_loss_and_every_gradient(tiny_llama, qwen2, family, chunk_tokens):
    model_dir = qwen2 if family == "qwen2" else tiny_llama
    batch = batch_of(model_dir)
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert targets > 64  # every chunk size splits the batch into several chunks

    def loss_and_gradients(chunk: int) -> tuple[float, dict[str, torch.Tensor]]:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if family == "llama_lora":
            from recipes.core.model.lora import CAUSAL_LM, apply_lora

            torch.manual_seed(0)  # the same adapters' initial weights in both models
            model = apply_lora(model, SFTConfig(use_peft=True, lora_r=4, lora_alpha=8), CAUSAL_LM)
        loss = CausalLMLoss(model, chunk)
        summed = loss(model(**causal_lm_inputs(batch), **loss.model_kwargs), batch["labels"])
        summed.backward()
        return summed.item(), gradients(model)

    full_loss, full_grads = loss_and_gradients(0)
    chunked_loss, chunked_grads = loss_and_gradients(chunk_tokens)
    # Chunks change the head's sums and the loss's: each target's logits over the hidden size, its
    # log-softmax over the vocabulary and the sum of the targets' positive losses, in another order.
    config = AutoConfig.from_pretrained(model_dir)
    loss_terms = config.hidden_size + config.vocab_size + targets
    assert abs(chunked_loss - full_loss) <= float32_tolerance(loss_terms, full_loss)
    assert chunked_grads.keys() == full_grads.keys() and full_grads
    # The gradient's: the log-softmax's, the model's sums back from what the head passes on (forward_terms),
    # and each weight's sum over the batch's positions. Its rounding is relative to the size of the terms it
    # adds, which the whole gradient's largest element stands for: a tensor's own largest element does not
    # where its terms nearly cancel (softmax ignores a shift of every key, so the key biases' gradient is
    # small next to the terms it adds).
    positions = batch["labels"].numel()
    terms = config.vocab_size + forward_terms(config, batch["labels"].shape[1]) + positions
    scale = max(grad.abs().max().item() for grad in full_grads.values())
    for name, grad in full_grads.items():
        assert (chunked_grads[name] - grad).abs().max().item() <= float32_tolerance(terms, scale), name


def test_chunked_loss_never_computes_more_logits_than_a_chunk(tiny_llama):
    """The model returns no logits; the head only ever sees a chunk of target positions, once in the
    forward and once more in the backward's recomputation."""
    batch = batch_of(tiny_llama)
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    loss = CausalLMLoss(model, chunk_tokens=16)
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: rows.append(out.shape[:-1]))
    outputs = model(**causal_lm_inputs(batch), **loss.model_kwargs)
    assert outputs.logits.shape[:2] == (batch["labels"].shape[0], 0)  # the model computed no logits
    rows.clear()
    loss(outputs, batch["labels"]).backward()
    chunks = [min(16, targets - start) for start in range(0, targets, 16)]
    assert rows == [(n,) for n in chunks] + [(n,) for n in reversed(chunks)]


def test_chunked_loss_refuses_a_negative_chunk_and_a_model_without_logits_to_keep(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with pytest.raises(ConfigError, match="loss_chunk_tokens is -1; use a positive number, or 0"):
        CausalLMLoss(model, -1)

    class NoLogitsToKeep(torch.nn.Module):
        def forward(self, input_ids): ...

    with pytest.raises(ConfigError, match=r"NoLogitsToKeep\.forward takes no logits_to_keep"):
        CausalLMLoss(NoLogitsToKeep(), 8)
    CausalLMLoss(NoLogitsToKeep(), 0)  # all logits at once needs nothing of the model


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """What the run trained: its final model, or with LoRA its adapter."""
    adapter = run / "final" / "adapter_model.safetensors"
    return load_file(adapter) if adapter.is_file() else load_weights(run / "final")


def assert_same_run(ours: Path, reference: Path, exact: bool = False) -> None:
    """LRs and token counts equal, and the per-step losses and final trained weights of the reference:
    `exact`ly for a lever that repeats the same float operations in the same order (recomputation), else
    to the rounding of another order of the same sums (loss_tolerance, adam_tolerance)."""
    a, b = train_records(ours), train_records(reference)
    assert [(r["step"], r["tokens"], r["lr"]) for r in a] == [(r["step"], r["tokens"], r["lr"]) for r in b]
    theirs, sums = final_weights(reference), run_sums(reference)
    n_weights = sum(t.numel() for t in theirs.values())
    for x, y in zip(a, b, strict=True):
        tolerance = 0.0 if exact else step_loss_tolerance(y, b, sums, n_weights)
        assert abs(x["loss"] - y["loss"]) <= tolerance, (x, y)
    tolerance = 0.0 if exact else adam_tolerance(sums.gradient, [r["lr"] for r in b], n_weights)
    assert weight_distance(final_weights(ours), theirs) <= tolerance


def train(reference, name: str, out: Path, *extra: str) -> Path:
    """The reference run `name`'s arguments with `extra`, in this process, into `out`."""
    in_process("sft", [*reference.args(name), "--output_dir", str(out), "--report_to", "none", *extra])
    return out


@pytest.mark.parametrize("name", ["1proc", "1proc_qwen2"])
def test_one_process_run_with_all_logits_at_once_equals_the_chunked_run(reference, name, tmp_path):
    assert_same_run(train(reference, name, tmp_path / "full", *FULL_LOGITS), reference(name))


def test_a_run_in_chunks_of_three_tokens_takes_the_losses_of_the_full_logits_run(reference, tmp_path):
    """Many chunks per micro-batch: the head's gradient and the loss add their chunks in another order, so
    the losses and weights agree to that order's rounding."""
    chunked = train(reference, "1proc", tmp_path / "chunks", "--loss_chunk_tokens", "3")
    full = train(reference, "1proc", tmp_path / "full", *FULL_LOGITS)
    assert_same_run(chunked, full)


def test_lora_run_with_all_logits_at_once_equals_the_chunked_run(reference, tmp_path):
    lora = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8"]
    chunked = train(reference, "1proc", tmp_path / "chunked", *lora)
    full = train(reference, "1proc", tmp_path / "full", *lora, *FULL_LOGITS)
    assert_same_run(chunked, full)


# -------------------------------------------------------------------- activation checkpointing
def test_gradient_checkpointing_gives_the_same_losses_and_weights(reference, tmp_path):
    recomputed = train(reference, "1proc", tmp_path / "ckpt", *CHECKPOINTING)
    assert_same_run(recomputed, reference("1proc"), exact=True)


def test_gradient_checkpointing_replays_the_dropout_masks(reference, tmp_path):
    model = make_tiny_decoder(tmp_path / "dropout", attention_dropout=0.1)
    plain = train(reference, "1proc", tmp_path / "plain", "--model_name_or_path", str(model))
    recomputed = train(
        reference, "1proc", tmp_path / "ckpt", "--model_name_or_path", str(model), *CHECKPOINTING
    )
    assert_same_run(recomputed, plain, exact=True)


def test_gradient_checkpointing_with_lora_gives_the_same_adapter(reference, tmp_path):
    lora = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8"]
    plain = train(reference, "1proc", tmp_path / "plain", *lora)
    recomputed = train(reference, "1proc", tmp_path / "ckpt", *lora, *CHECKPOINTING)
    assert_same_run(recomputed, plain, exact=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, accelerate_config",
    [
        ("ddp", TWO_PROCESSES),  # whole weights, as under ZeRO-1/2
        ("zero3", "accelerate_configs/ds_zero3.yaml"),  # the head's weight is partitioned
    ],
)
def test_all_logits_with_gradient_checkpointing_equals_the_chunked_run_on_two_processes(
    reference, name, accelerate_config, tmp_path
):
    """Both levers at once, against the reference (chunked, no checkpointing): each must be exact."""
    out = tmp_path / "run"
    launch(
        accelerate_config,
        "sft",
        [*reference.args(name), "--output_dir", str(out), *FULL_LOGITS, *CHECKPOINTING],
    )
    assert_same_run(out, reference(name))


@pytest.mark.slow
def test_zero3_ranks_with_different_chunk_counts_train_and_evaluate_like_one_chunk(reference, tmp_path):
    """Chunks of 7 tokens give the two ranks different numbers of chunks in most micro-batches, and under
    ZeRO-3 each call of the head gathers its weight from both ranks: they must still call it as often
    (or the run hangs), in training and in evaluation. To rounding, as for chunks of three."""
    out = tmp_path / "run"
    args = [*reference.args("zero3"), "--output_dir", str(out), "--loss_chunk_tokens", "7"]
    launch("accelerate_configs/ds_zero3.yaml", "sft", args, timeout=300)
    assert_same_run(out, reference("zero3"))
    evals, reference_evals = eval_records(out), eval_records(reference("zero3"))
    assert [r["step"] for r in evals] == [r["step"] for r in reference_evals] and len(evals) > 1
    records, sums = train_records(reference("zero3")), run_sums(reference("zero3"))
    n_weights = sum(t.numel() for t in final_weights(reference("zero3")).values())
    for x, y in zip(evals, reference_evals, strict=True):
        tolerance = eval_loss_tolerance(y, records, sums, n_weights)
        assert abs(x["eval_loss"] - y["eval_loss"]) <= tolerance, (x, y)


# -------------------------------------------------------------------- bf16
def assert_bf16_run_follows_the_fp32_plan(ours: Path, fp32: Path) -> None:
    """The plan, the steps and every LR exactly; losses within bf16's precision of the fp32 run."""
    assert load_plan(ours) == load_plan(fp32)
    a, b = train_records(ours), train_records(fp32)
    assert [(r["step"], r["tokens"], r["lr"]) for r in a] == [(r["step"], r["tokens"], r["lr"]) for r in b]
    assert len(a) == JOB_STEPS
    n_weights = sum(t.numel() for t in final_weights(fp32).values())
    for x, y in zip(a, b, strict=True):
        tolerance = bf16_loss_tolerance(y["loss"], b, y["step"] - 1, n_weights)
        assert abs(x["loss"] - y["loss"]) <= tolerance, (x, y)


def test_bf16_on_one_process_keeps_fp32_master_weights_and_optimizer_states(reference, tmp_path):
    from accelerate.utils.other import load

    out = train(reference, "1proc", tmp_path / "bf16", *BF16)
    assert_bf16_run_follows_the_fp32_plan(out, reference("1proc"))
    checkpoint = out / "checkpoint-4"
    assert {t.dtype for t in load_file(checkpoint / "model.safetensors").values()} == {torch.float32}
    states = load(checkpoint / "optimizer.bin", map_location="cpu")["state"]
    assert {t.dtype for s in states.values() for k, t in s.items() if k != "step"} == {torch.float32}
    assert {t.dtype for t in load_weights(out / "final").values()} == {torch.float32}


def test_bf16_accumulation_equals_one_big_bf16_batch(reference, tmp_path):
    """Micro 2 x GA 4 against micro 8 in bf16: the same samples per step, but bf16 rounds differently
    when a batch's shape changes (padding lengths change the attention's reductions), so the losses and
    gradient norms are held to bf16's rounding, not float32's."""
    small = train(reference, "1proc", tmp_path / "small", *BF16)
    big = train(reference, "big_batch", tmp_path / "big", *BF16)
    a, b = train_records(small), train_records(big)
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    n_weights = sum(t.numel() for t in final_weights(big).values())
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= bf16_loss_tolerance(y["loss"], b, y["step"] - 1, n_weights)
        # the gradients' two bf16 roundings (bf16_loss_tolerance) move their norm by no more, relatively
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 2 * BF16_UNIT_ROUNDOFF * y["grad_norm"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, accelerate_config",
    [
        ("ddp", TWO_PROCESSES),
        ("zero1", "accelerate_configs/ds_zero1.yaml"),
        ("zero2", "accelerate_configs/ds_zero2.yaml"),
        ("zero3", "accelerate_configs/ds_zero3.yaml"),
    ],
)
def test_bf16_on_two_processes_follows_the_plan_with_fp32_master_states(
    reference, name, accelerate_config, tmp_path
):
    out = tmp_path / "bf16"
    launch(accelerate_config, "sft", [*reference.args(name), "--output_dir", str(out), *BF16])
    assert_bf16_run_follows_the_fp32_plan(out, reference(name))
    checkpoint = out / "checkpoint-4"
    if name == "ddp":
        from accelerate.utils.other import load

        assert {t.dtype for t in load_file(checkpoint / "model.safetensors").values()} == {torch.float32}
        states = load(checkpoint / "optimizer.bin", map_location="cpu")["state"]
        assert {t.dtype for s in states.values() for k, t in s.items() if k != "step"} == {torch.float32}
        return
    # DeepSpeed computes with bf16 weights and keeps the fp32 master partition, and Adam's states, in
    # its optimizer files (its own pickles, read here as DeepSpeed reads them).
    [optimizer_file, *_] = sorted((checkpoint / "pytorch_model").glob("bf16_zero_pp_rank_0_*optim_states.pt"))
    saved = torch.load(optimizer_file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    masters = saved["fp32_flat_groups" if name == "zero3" else "single_partition_of_fp32_groups"]
    assert masters and {t.dtype for t in masters} == {torch.float32}
    adam = saved["optimizer_state_dict" if name == "zero3" else "base_optimizer_state"]["state"]
    assert {t.dtype for s in adam.values() for t in s.values()} == {torch.float32}
    assert json.loads((out / "ds_config.json").read_text())["bf16"]["enabled"] is True


# -------------------------------------------------------------------- attention, padding, compilation
def test_eager_attention_trains_like_sdpa(reference, tmp_path):
    eager = train(reference, "1proc", tmp_path / "eager", "--attn_implementation", "eager")
    assert_same_run(eager, reference("1proc"))  # another attention kernel adds in another order


@pytest.mark.parametrize(
    "name, on_gpu, message",
    [
        ("flash_attention_2", True, "attn_implementation flash_attention_2 needs the package flash-attn, which is not installed"),
        ("flex_attention", False, "attn_implementation flex_attention cannot train on a CPU (its backward needs a GPU)"),
        ("flash", True, "attn_implementation 'flash' is not one of eager, sdpa, flex_attention"),
    ],
)  # fmt: skip
def test_attention_the_machine_cannot_train_with_is_refused_naming_what_is_missing(name, on_gpu, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_attention(name, on_gpu)


def test_padding_to_a_multiple_changes_shapes_but_not_the_run(reference, tmp_path):
    padded = train(reference, "1proc", tmp_path / "padded", "--pad_to_multiple_of", "32")
    assert_same_run(padded, reference("1proc"))  # longer rows: the kernels add in another order
    pad = PadCollator(0, pad_to_multiple_of=8)([{"input_ids": [5] * 11, "labels": [5] * 11}])
    assert pad["input_ids"].shape == (1, 16) and pad["attention_mask"].sum() == 11
    packed = PackedCollator(0, pad_to_multiple_of=8)([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}] * 3)
    assert packed["input_ids"].shape == (1, 16)
    assert packed["position_ids"].tolist() == [[0, 1, 2] * 3 + list(range(7))]  # padding: a sample of its own
    assert (packed["labels"][0, 9:] == IGNORE_INDEX).all()


@pytest.mark.slow  # inductor compiles in worker processes
@pytest.mark.parametrize("checkpointing", [False, True])
def test_torch_compile_trains_like_the_eager_run_and_records_its_compilations(
    reference, checkpointing, tmp_path
):
    """Without evaluation, so that every compiled graph is one that trains (the layers, or with activation
    checkpointing the model's body around its checkpoints). Every micro-batch is padded to max_seq_length
    (96): one shape, compiled once, where each further shape costs a compilation (without inductor's
    cache, as on a fresh machine, padding to 32 took these two tests 57 s on 2 cores, one shape 34 s)."""
    fields = ["--eval_split", "null", "--pad_to_multiple_of", "96", *(CHECKPOINTING if checkpointing else [])]
    eager = train(reference, "1proc", tmp_path / "eager", *fields)
    compiled = train(reference, "1proc", tmp_path / "compiled", "--torch_compile", "true", *fields)
    assert_same_run(compiled, eager)  # compiled kernels add in another order
    [end] = [r for r in read_jsonl(compiled / "metrics.jsonl") if "train_runtime" in r]
    assert end["compiled_graphs"] >= 1
    assert set(load_weights(compiled / "final")) == set(load_weights(eager / "final"))
