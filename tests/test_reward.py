"""The reward-model recipe trains the Bradley-Terry loss it states and its arithmetic is exact: the eval loss
it records is the loss of the model it saved (which loads as a one-output sequence classifier), accumulation
and data parallelism equal one big batch of pairs, a margin column shifts each pair's loss, and bad margins
are named by row.
The runs are the DPO tests' tiny job: 20 pairs of the bundled preference data at micro batch 2, 8 pairs
per optimizer step (GA 4 on one process, GA 2 on two, GA 1 at micro batch 8), 6 steps over 2 epochs.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    REPO,
    TWO_PROCESSES,
    Sums,
    adam_tolerance,
    eval_records,
    float32_tolerance,
    forward_terms,
    in_process,
    launch,
    load_plan,
    load_weights,
    max_weight_diff,
    train_records,
    weight_distance,
    write_jsonl,
)
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from recipes.core.data.preferences import PairCollator, load_preference_data
from recipes.core.errors import DataError
from recipes.core.losses.reward_model import pair_losses, pair_metrics
from recipes.reward import RewardConfig

PREFERENCES = REPO / "recipes" / "data" / "preferences"
STEPS, PAIRS, MAX_LENGTH, EVAL_PAIRS, CENTRE = 6, [8, 8, 4] * 2, 96, 6, 0.01
JOB = [
    "--dataset_name", str(PREFERENCES), "--max_train_samples", "20", "--per_device_train_batch_size", "2",
    "--global_batch_size", "8", "--num_train_epochs", "2", "--warmup_steps", "1", "--max_prompt_length", "64",
    "--max_length", str(MAX_LENGTH), "--learning_rate", "1e-3", "--seed", "7", "--max_eval_samples",
    str(EVAL_PAIRS), "--per_device_eval_batch_size", "4", "--logging_steps", "1", "--save_steps", "0",
    "--report_to", "none", "--center_rewards_coefficient", str(CENTRE),
]  # fmt: skip
RUNS = {  # name: (accelerate config, or None to run in this process; extra arguments)
    "1proc": (None, []),
    "big_batch": (None, ["--per_device_train_batch_size", "8"]),
    "ddp": (TWO_PROCESSES, []),
    "zero3": ("accelerate_configs/ds_zero3.yaml", []),
    "fsdp2": ("accelerate_configs/fsdp2.yaml", []),
}


def reward_args(model: Path, output_dir: Path, *extra: str) -> list[str]:
    config = "recipes/configs/reward_smollm2.yaml"
    return [
        "--config",
        config,
        "--model_name_or_path",
        str(model),
        "--output_dir",
        str(output_dir),
        *JOB,
        *extra,
    ]


class Runs:
    def __init__(self, model: Path, tmp_path_factory):
        self.model, self.tmp_path_factory, self.made = model, tmp_path_factory, {}

    def __getitem__(self, name: str) -> Path:
        if name not in self.made:
            out = self.tmp_path_factory.mktemp(f"reward_{name}")
            config, extra = RUNS[name]
            args = reward_args(self.model, out, *extra)
            in_process("reward", args) if config is None else launch(config, "reward", args)
            self.made[name] = out
        return self.made[name]


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory) -> Runs:
    return Runs(tiny_llama, tmp_path_factory)


# ---------------------------------------------------------------- the loss and the saved model
def test_pair_losses_follow_bradley_terry_with_margin_and_centring():
    chosen, rejected = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.0])
    margin = torch.tensor([0.5, 0.0, -1.0])
    expected = [
        math.log1p(math.exp(-(c - r - m))) + 0.1 * (c + r) ** 2
        for c, r, m in zip(chosen.tolist(), rejected.tolist(), margin.tolist(), strict=True)
    ]
    assert pair_losses(chosen, rejected, margin, 0.1).tolist() == pytest.approx(expected, rel=1e-6)
    assert pair_losses(chosen, rejected).tolist() == pytest.approx(
        [math.log1p(math.exp(-(c - r))) for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True)],
        rel=1e-6,
    )
    metrics = pair_metrics(chosen, rejected)  # accuracy, margin, chosen, rejected
    assert metrics[:, 0].tolist() == [1.0, 0.0, 0.0]  # a tie is not a win
    assert metrics[:, 1].tolist() == [1.0, -1.0, 0.0]


def test_the_recorded_eval_loss_is_the_saved_models_loss_on_the_eval_pairs(runs, tiny_llama):
    """final/ is a one-output sequence classifier that scores a sequence at its last token before padding;
    scored here pair by pair (no padding at all), its Bradley-Terry loss on the 6 eval pairs is the run's
    last eval record."""
    run = runs["1proc"]
    model = AutoModelForSequenceClassification.from_pretrained(run / "final", dtype=torch.float32).eval()
    assert model.config.num_labels == 1 and model.score.out_features == 1
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    cfg = RewardConfig(**yaml.safe_load((run / "config.yaml").read_text()))
    _, eval_set, _ = load_preference_data(cfg, tokenizer, numbers=("margin",))
    collate, losses, wins = PairCollator(model.config.pad_token_id), [], []
    with torch.no_grad():
        for pair in eval_set:
            scores = model(**{k: v for k, v in collate([pair]).items() if k != "labels"}).logits[:, 0]
            losses.append(pair_losses(scores[:1], scores[1:], None, CENTRE).item())
            wins.append(float(scores[0] > scores[1]))
    last = eval_records(run)[-1]
    assert last["step"] == STEPS
    config = AutoConfig.from_pretrained(tiny_llama)
    # The two evaluations add each score over forward_terms, in other orders (padded batches of 4 pairs
    # against single pairs); a pair's loss moves by at most its score difference's change (slope <= 1,
    # plus the centring term's 2 CENTRE |r_c + r_r|), and the mean over EVAL_PAIRS adds its own rounding.
    scale = max(abs(x) for x in (last["eval_chosen"], last["eval_rejected"])) + 1.0
    tolerance = 2 * (1 + 4 * CENTRE * scale) * float32_tolerance(forward_terms(config, MAX_LENGTH), scale)
    tolerance += float32_tolerance(EVAL_PAIRS, last["eval_loss"])
    assert abs(sum(losses) / len(losses) - last["eval_loss"]) <= tolerance
    assert sum(wins) / len(wins) == last["eval_accuracy"]


def test_run_takes_the_planned_steps_over_the_planned_pairs(runs):
    records, plan = train_records(runs["1proc"]), load_plan(runs["1proc"])
    assert (
        [r["step"] for r in records]
        == list(range(1, STEPS + 1))
        == list(range(1, plan["total_optimizer_steps"] + 1))
    )
    assert [r["pairs"] for r in records] == PAIRS
    assert plan["data"]["train_pairs"] == 20 and plan["trainable_parameters"] == plan["total_parameters"]
    assert all({"accuracy", "margin", "chosen", "rejected"} <= r.keys() for r in records)
    assert records[-1]["loss"] < records[0]["loss"]  # lr 1e-3 on 20 pairs: it learns them


# ---------------------------------------------------------------- exactness
def assert_one_big_batch(ours: Path, reference: Path, model: Path) -> None:
    """Each step's loss and the final weights of the reference, to the rounding of the same sums in another
    order: a step's loss is a mean over its pairs of Bradley-Terry losses of two scores (slope <= 1 in their
    difference, plus the centring term's), each score a forward over up to MAX_LENGTH positions; the weights
    within adam_tolerance of the gradients' sums."""
    a, b = train_records(ours), train_records(reference)
    assert [r["pairs"] for r in a] == [r["pairs"] for r in b] == PAIRS
    theirs = load_weights(reference / "final")
    n_weights = sum(t.numel() for t in theirs.values())
    config = AutoConfig.from_pretrained(model)
    sums = Sums(config, MAX_LENGTH, 2 * 8, 2 * EVAL_PAIRS, outputs=2)
    gradient = max(r["grad_norm"] for r in b)
    for x, y in zip(a, b, strict=True):
        scale = max(abs(y["chosen"]), abs(y["rejected"])) + 1.0
        score = 2 * (1 + 4 * CENTRE * scale) * float32_tolerance(sums.loss(y["pairs"]), scale)
        lrs = [r["lr"] for r in b if r["step"] < y["step"]]
        drift = gradient * adam_tolerance(sums.gradient, lrs, n_weights)
        assert abs(x["loss"] - y["loss"]) <= score + float32_tolerance(y["pairs"], y["loss"]) + drift, (x, y)
    assert weight_distance(load_weights(ours / "final"), theirs) <= adam_tolerance(
        sums.gradient, [r["lr"] for r in b], n_weights
    )
    assert max_weight_diff(theirs, load_weights(reference / "final")) == 0.0


def test_accumulation_equals_one_big_batch_of_pairs_on_one_process(runs, tiny_llama):
    assert_one_big_batch(runs["1proc"], runs["big_batch"], tiny_llama)


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["ddp", "zero3", "fsdp2"])
def test_accumulation_and_data_parallelism_equal_one_big_batch_of_pairs(runs, tiny_llama, topology):
    """On 2 processes, DDP, ZeRO-3 and FSDP2 (each rank holding half of every parameter, the new score head
    included) train the pairs as one process trains one big batch."""
    assert_one_big_batch(runs[topology], runs["big_batch"], tiny_llama)


# ---------------------------------------------------------------- the margin column
def margin_rows() -> list[dict]:
    return [
        {"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}.", "rejected": f"{i + 2}.", "margin": 0.5 * i}
        for i in range(6)
    ]


def test_a_margin_column_travels_with_its_pairs_into_the_batch(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", margin_rows())
    cfg = RewardConfig(
        model_name_or_path=str(tiny_llama), dataset_name=str(data), eval_split=None, max_length=32,
        max_prompt_length=16,
    )  # fmt: skip
    train_set, _, _ = load_preference_data(
        cfg, AutoTokenizer.from_pretrained(tiny_llama), numbers=("margin",)
    )
    batch = PairCollator(0)([train_set[i] for i in range(len(train_set))])
    assert batch["margin"].tolist() == [0.5 * i for i in range(6)]
    assert batch["input_ids"].shape[0] == 12  # chosen then rejected


def test_a_margin_that_is_not_a_number_is_named_by_row(tiny_llama, tmp_path):
    rows = margin_rows()
    rows[3]["margin"] = "large"
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = RewardConfig(
        model_name_or_path=str(tiny_llama), dataset_name=str(data), eval_split=None, max_length=32,
        max_prompt_length=16,
    )  # fmt: skip
    with pytest.raises(
        DataError, match=r"line 4.*column 'margin': 'large' is not a number; give every row's"
    ):
        load_preference_data(cfg, AutoTokenizer.from_pretrained(tiny_llama), numbers=("margin",))


# ---------------------------------------------------------------- a separable toy set, and use in GRPO
def test_on_a_separable_toy_set_the_pair_accuracy_reaches_one(tiny_llama, tmp_path):
    """Chosen replies are "yes." or "sure.", rejected ones "no." or "never.", in every combination: a reward
    of the reply's word alone separates every pair, which a few steps learn, with the loss well down."""
    replies = [(c, r) for c in ("yes.", "sure.") for r in ("no.", "never.")]
    rows = [
        {"prompt": f"Is {i} a number?", "chosen": replies[i % 4][0], "rejected": replies[i % 4][1]}
        for i in range(16)
    ]
    data = write_jsonl(tmp_path / "toy.jsonl", rows)
    out = tmp_path / "toy_run"
    args = reward_args(tiny_llama, out, "--dataset_name", str(data), "--eval_split_size", "4")
    in_process(
        "reward", [*args, "--max_train_samples", "12", "--num_train_epochs", "4", "--learning_rate", "1e-2"]
    )
    first, last = eval_records(out)[0], eval_records(out)[-1]
    assert last["eval_accuracy"] == 1.0
    assert last["eval_loss"] < first["eval_loss"] / 4 and last["eval_margin"] > first["eval_margin"]


def test_a_trained_reward_model_is_a_grpo_reward_function(runs):
    """reward_funcs names it by directory; it scores prompt + completion as the recipe scored its pairs."""
    from recipes.core.losses.rewards import load_reward_functions, score

    run = runs["1proc"]
    (reward,) = load_reward_functions([str(run / "final")])
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}]] * 2
    completions = [[{"role": "assistant", "content": "4."}], [{"role": "assistant", "content": "5."}]]
    (values,) = score([reward], prompts, completions, [[0], [0]], {})
    model = AutoModelForSequenceClassification.from_pretrained(run / "final", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    with torch.no_grad():
        alone = [
            model(
                input_ids=torch.tensor(
                    [tokenizer.apply_chat_template([*p, *c], tokenize=True, return_dict=True)["input_ids"]]
                )
            )
            .logits[0, 0]
            .item()
            for p, c in zip(prompts, completions, strict=True)
        ]
    # the same forward on the same tokens, batched with right padding: a score's rounding over forward_terms
    config = model.config
    for got, expected in zip(values, alone, strict=True):
        assert abs(got - expected) <= float32_tolerance(forward_terms(config, 32), abs(expected) + 1.0)


def test_a_classifier_with_more_than_one_output_is_refused_as_a_reward_model(tiny_llama, tmp_path):
    from recipes.core.config import ConfigError
    from recipes.core.losses.rewards import load_reward_functions

    two = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=2)
    two.save_pretrained(tmp_path / "two")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(tmp_path / "two")
    with pytest.raises(ConfigError) as err:
        load_reward_functions([str(tmp_path / "two")])
    assert str(err.value) == (
        f"reward_funcs entry {str(tmp_path / 'two')!r} is a classifier with 2 outputs; a reward model has one "
        "(a score): train one with recipes/reward.py, or name a function as module:function"
    )
