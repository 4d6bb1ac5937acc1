"""Padding-free batches (`packing: true`): the same samples, targets, loss and gradients as padded ones."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    JOB_STEPS,
    adam_tolerance,
    float32_tolerance,
    forward_terms,
    in_process,
    load_plan,
    load_weights,
    make_tiny_decoder,
    max_weight_diff,
    run_sums,
    step_loss_tolerance,
    train_records,
    weight_distance,
)
from transformers import AutoModelForCausalLM

from recipes.core.data.chat import (
    IGNORE_INDEX,
    PackedCollator,
    PadCollator,
    causal_lm_inputs,
)
from recipes.core.losses.accumulation import per_sample_token_loss

SAMPLES = [
    {"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9]},
    {"input_ids": [10, 11], "labels": [10, 11]},  # a target in first place can never be predicted
    {"input_ids": [12, 13, 14, 15], "labels": [IGNORE_INDEX, 13, IGNORE_INDEX, 15]},
]


def test_packed_row_holds_every_sample_end_to_end_with_restarting_positions():
    batch = PackedCollator()(SAMPLES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3]]
    # No sample's first token is a target: nothing learns to predict where the next sample starts.
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, 9, -100, 11, -100, 13, -100, 15]]
    assert "attention_mask" not in batch


def test_padded_batch_spends_the_rest_of_its_slots_on_padding():
    batch = PadCollator(pad_token_id=0)(SAMPLES)
    assert batch["input_ids"].shape == (3, 5)
    assert batch["attention_mask"].sum().item() == 11  # of 15 slots: 4 are padding


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_packed_forward_gives_each_sample_the_logits_it_gets_padded(tmp_path, family):
    model = AutoModelForCausalLM.from_pretrained(make_tiny_decoder(tmp_path, family), dtype=torch.float32)
    samples = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in (17, 5, 30, 9)]
    with torch.no_grad():
        padded = PadCollator(pad_token_id=0)(samples)
        padded_logits = model(**causal_lm_inputs(padded)).logits
        packed = PackedCollator()(samples)
        packed_logits = model(**causal_lm_inputs(packed)).logits[0]
    # Another row length adds the attention's sums in another order: rounding, relative to the logits.
    positions = max(len(s["input_ids"]) for s in samples)
    largest = padded_logits.abs().max().item()
    logits_tolerance = float32_tolerance(forward_terms(model.config, positions), largest)
    start = 0
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        diff = (packed_logits[start : start + n] - padded_logits[i, :n]).abs().max().item()
        assert diff <= logits_tolerance, f"sample {i}: packed logits differ by {diff}"
        start += n
    # The token-summed loss is the same too, so the recipe's token-mean loss and gradients are: each
    # target's loss (a log-softmax over the vocabulary) moves by at most twice its logits' rounding, and
    # the sum adds the targets' positive losses in another order.
    padded_sum = per_sample_token_loss(padded_logits, padded["labels"])[0].sum().item()
    packed_sum = per_sample_token_loss(packed_logits[None], packed["labels"])[0].sum().item()
    targets = int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    summed = float32_tolerance(targets + model.config.vocab_size, padded_sum)
    assert abs(padded_sum - packed_sum) <= 2 * targets * logits_tolerance + summed


def test_packed_training_takes_the_same_steps_losses_and_weights_as_padded(reference, tiny_llama, tmp_path):
    packed_run, padded_run = tmp_path / "packed", reference("1proc")
    in_process("sft", [*reference.args("1proc"), "--output_dir", str(packed_run), "--packing", "true"])
    padded, packed = train_records(padded_run), train_records(packed_run)
    assert load_plan(packed_run) == load_plan(padded_run)
    assert [r["step"] for r in packed] == list(range(1, JOB_STEPS + 1))
    assert [r["tokens"] for r in packed] == [r["tokens"] for r in padded]
    assert [r["lr"] for r in packed] == [r["lr"] for r in padded]
    final, sums = {run: load_weights(run / "final") for run in (padded_run, packed_run)}, run_sums(padded_run)
    n_weights = sum(t.numel() for t in final[padded_run].values())
    for a, b in zip(padded, packed, strict=True):  # the same sums, added in another order
        assert abs(a["loss"] - b["loss"]) <= step_loss_tolerance(a, padded, sums, n_weights), (a, b)
    tolerance = adam_tolerance(sums.gradient, [r["lr"] for r in padded], n_weights)
    assert weight_distance(final[padded_run], final[packed_run]) <= tolerance
    # Training moved the weights by far more than the packed/padded difference.
    assert max_weight_diff(final[padded_run], load_weights(tiny_llama)) > 1e-3
