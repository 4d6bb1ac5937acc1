"""The shapes SFT data comes in (messages, ShareGPT, Alpaca, prompt/completion, plain text), mixtures of
datasets, split slices, and the kinds of path a dataset may live at: each trains through the real recipe,
and the tokens it trains on are exactly the ones an independent reading of the rows says."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from helpers import (
    CHATML,
    EXAMPLES,
    SFT_DATA,
    float32_tolerance,
    forward_terms,
    in_process,
    job_args,
    load_plan,
    make_chat_tokenizer,
    read_jsonl,
    record_train_sets,
    train_records,
    write_csv,
    write_jsonl,
)
from transformers import AutoTokenizer

from recipes.core.data.chat import IGNORE_INDEX, PadCollator, causal_lm_inputs
from recipes.core.data.loading import load, load_split
from recipes.core.data.sft import load_sft_data
from recipes.core.errors import DataError
from recipes.sft import SFTConfig

ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}
FORMATS = {
    "messages.jsonl": "messages",
    "sharegpt.jsonl": "sharegpt",
    "alpaca.jsonl": "alpaca",
    "prompt_completion.jsonl": "prompt_completion",
    "prompt_completion_chat.jsonl": "prompt_completion",
    "text.jsonl": "text",
}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


# ---------------------------------------------------------------- what each row should train on
def text_of(content) -> str:
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def chat_turns(row: dict) -> list[tuple[str, str, bool]]:
    """(role, text, trained) of every turn of a row, read from the row by hand."""
    if "messages" in row:
        return [(t["role"], text_of(t["content"]), t["role"] == "assistant") for t in row["messages"]]
    if "conversations" in row:
        return [(ROLES[t["from"]], t["value"], t["from"] == "gpt") for t in row["conversations"]]
    if "instruction" in row:
        user = row["instruction"] + (f"\n{row['input']}" if row["input"] else "")
        return [("user", user, False), ("assistant", row["output"], True)]
    prompt = [(t["role"], t["content"], False) for t in row["prompt"]]
    return prompt + [(t["role"], t["content"], t["role"] == "assistant") for t in row["completion"]]


def chatml_sample(tokenizer, row: dict) -> tuple[list[int], list[bool], str]:
    """input_ids, which of them are targets, and the text the targets spell: the ChatML rendering written
    out here (not through the chat template), each trained reply from its first token to its end marker."""
    text, spans, trained_text = "", [], ""
    for role, content, trained in chat_turns(row):
        start = len(text) + len(f"<|im_start|>{role}\n")
        text += f"<|im_start|>{role}\n{content}<|im_end|>\n"
        if trained:
            spans.append((start, len(text)))
            trained_text += f"{content}<|im_end|>\n"
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    targets = [any(a <= first < b for a, b in spans) for first, _ in encoded["offset_mapping"]]
    return encoded["input_ids"], targets, trained_text


def completion_sample(tokenizer, row: dict) -> tuple[list[int], list[bool], str]:
    prompt = tokenizer(row["prompt"])["input_ids"]
    completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    return (
        prompt + completion,
        [False] * len(prompt) + [True] * len(completion),
        row["completion"] + "<|im_end|>",
    )


def text_blocks(tokenizer, rows: list[dict], block: int) -> list[tuple[list[int], list[bool], list[int]]]:
    """input_ids, targets and position ids of each block: documents with EOS after each, end to end, cut
    every `block` tokens; a document's first token (and a block's first) has nothing before it to learn from."""
    stream, starts = [], set()
    for row in rows:
        starts.add(len(stream))
        stream += tokenizer(row["text"])["input_ids"] + [tokenizer.eos_token_id]
    out = []
    for begin in range(0, len(stream), block):
        ids = stream[begin : begin + block]
        first = [i == 0 or begin + i in starts for i in range(len(ids))]
        positions, position = [], 0
        for is_first in first:
            position = 0 if is_first else position + 1
            positions.append(position)
        out.append((ids, [not f for f in first], positions))
    return out


def trained(sample: dict) -> list[bool]:
    return [label != IGNORE_INDEX for label in sample["labels"]]


def run_format(tiny_llama, tmp_path, monkeypatch, data, *extra):
    """One optimizer step of the recipe on `data`; the tokenised train set it trained on."""
    seen = record_train_sets(monkeypatch)
    out = tmp_path / "out"
    args = [
        "--dataset_name",
        str(data),
        "--eval_split",
        "null",
        "--max_seq_length",
        "256",
        "--max_steps",
        "1",
    ]
    args += [
        "--global_batch_size",
        "4",
        "--save_steps",
        "0",
        "--eval_steps",
        "0",
        "--warmup_steps",
        "0",
        *extra,
    ]
    in_process("sft", job_args(tiny_llama, out, *args))
    [train_set] = seen
    return out, train_set


# ---------------------------------------------------------------- every format through the recipe
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_example_file_trains_in_its_detected_format_on_exactly_the_tokens_its_rows_say(
    name, tiny_llama, tokenizer, tmp_path, monkeypatch, capsys
):
    rows = read_jsonl(EXAMPLES / name)
    block = 40  # plain text: several blocks, documents cut across them
    extra = ["--max_seq_length", str(block)] if name == "text.jsonl" else []
    out, train_set = run_format(tiny_llama, tmp_path, monkeypatch, EXAMPLES / name, *extra)
    printed = capsys.readouterr().out

    if name == "text.jsonl":
        expected = text_blocks(tokenizer, rows, block)
        assert [s["input_ids"] for s in train_set] == [ids for ids, _, _ in expected]
        assert [trained(s) for s in train_set] == [t for _, t, _ in expected]
        batch = PadCollator(tokenizer.pad_token_id)([train_set[0], train_set[len(train_set) - 1]])
        width = batch["input_ids"].shape[1]
        last = expected[-1][2] + list(range(width - len(expected[-1][2])))  # padding: a segment of its own
        assert batch["position_ids"].tolist() == [expected[0][2], last]
        assert "attention_mask" not in causal_lm_inputs(batch)  # boundaries come from the position ids
    else:
        sample = completion_sample if name == "prompt_completion.jsonl" else chatml_sample
        expected = [sample(tokenizer, row) for row in rows]
        assert [s["input_ids"] for s in train_set] == [ids for ids, _, _ in expected]
        assert [trained(s) for s in train_set] == [t for _, t, _ in expected]
        for s, (_, _, text) in zip(train_set, expected, strict=True):
            assert tokenizer.decode([t for t in s["labels"] if t != IGNORE_INDEX]) == text
    assert train_set["num_targets"] == [sum(trained(s)[1:]) for s in train_set]

    data = load_plan(out)["data"]
    [part] = data["train"]
    assert (part["format"], part["detected"], part["rows"], part["samples"]) == (
        FORMATS[name],
        True,
        len(rows),
        len(train_set),
    )
    assert f"format {FORMATS[name]} (detected from the columns), {len(rows)} rows" in printed
    [record] = train_records(out)
    assert record["step"] == 1 and np.isfinite(record["loss"])
    assert (out / "final" / "model.safetensors").is_file()


def test_dataset_format_and_columns_read_a_dataset_whose_columns_fit_several_formats(
    tiny_llama, tokenizer, tmp_path, monkeypatch
):
    rows = [
        {"question": r["prompt"], "answer": r["completion"], "text": "unrelated"}
        for r in read_jsonl(EXAMPLES / "prompt_completion.jsonl")
    ]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_sft_data(
            SFTConfig(
                dataset_name=str(data),
                eval_split=None,
                dataset_columns={"prompt": "question", "completion": "answer"},
            ),
            tokenizer,
        )
    assert str(err.value) == (
        f"split 'train' of {data} has columns ['question', 'answer', 'text'], which fit the formats "
        "prompt_completion, text; set dataset_format to the one it is (e.g. dataset_format: prompt_completion)"
    )
    columns = "{prompt: question, completion: answer}"
    _, train_set = run_format(
        tiny_llama,
        tmp_path,
        monkeypatch,
        data,
        "--dataset_format",
        "prompt_completion",
        "--dataset_columns",
        columns,
    )
    expected = [
        completion_sample(tokenizer, {"prompt": r["question"], "completion": r["answer"]}) for r in rows
    ]
    assert [s["input_ids"] for s in train_set] == [ids for ids, _, _ in expected]
    assert [trained(s) for s in train_set] == [t for _, t, _ in expected]


def test_conversational_prompt_completion_trains_only_the_completion_not_assistant_turns_of_the_prompt(
    tokenizer, tmp_path
):
    row = {
        "prompt": [
            {"role": "user", "content": "Say one."},
            {"role": "assistant", "content": "one"},
            {"role": "user", "content": "And two?"},
        ],
        "completion": [{"role": "assistant", "content": "two"}],
    }
    data = write_jsonl(tmp_path / "pc.jsonl", [row])
    train_set, _, _ = load_sft_data(SFTConfig(dataset_name=str(data), eval_split=None), tokenizer)
    ids, targets, text = chatml_sample(tokenizer, row)
    assert train_set[0]["input_ids"] == ids and trained(train_set[0]) == targets
    assert text == "two<|im_end|>\n"


def test_rows_without_an_assistant_turn_are_dropped_and_counted(tokenizer, tmp_path):
    rows = read_jsonl(EXAMPLES / "sharegpt.jsonl")
    rows[2]["conversations"] = rows[2]["conversations"][:1]  # a question without an answer
    rows[5]["conversations"] = [{"from": "system", "value": "Be brief."}]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    train_set, _, report = load_sft_data(SFTConfig(dataset_name=str(data), eval_split=None), tokenizer)
    [part] = report.train
    assert (part.rows, part.dropped, part.samples) == (8, 2, 6)
    kept = [row for i, row in enumerate(rows) if i not in (2, 5)]
    assert train_set["input_ids"] == [chatml_sample(tokenizer, row)[0] for row in kept]
    assert "8 rows: 6 kept, 0 truncated to 512 tokens, 2 dropped (no assistant turn to train on)" in (
        report.summary(512)
    )


def test_sharegpt_turns_in_a_messages_column_and_role_aliases_are_read(tokenizer, tmp_path):
    row = {"messages": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    data = write_jsonl(tmp_path / "chat.jsonl", [row])
    train_set, _, report = load_sft_data(SFTConfig(dataset_name=str(data), eval_split=None), tokenizer)
    assert report.train[0].format == "messages"
    assert train_set[0]["input_ids"] == chatml_sample(tokenizer, {"conversations": row["messages"]})[0]


@pytest.mark.parametrize(
    "example, column",
    [("messages", "messages"), ("sharegpt", "conversations"), ("prompt_completion_chat", "prompt")],
)
def test_message_lists_written_as_json_strings_in_a_csv_are_refused(tokenizer, tmp_path, example, column):
    """Not trained on as text: the rule DPO applies to its columns too (test_dpo_data.py)."""
    data = write_csv(tmp_path / "chat.csv", read_jsonl(EXAMPLES / f"{example}.jsonl"))
    with pytest.raises(DataError) as err:
        load_sft_data(SFTConfig(dataset_name=str(data), eval_split=None), tokenizer)
    assert str(err.value) == (
        f"{data} (split 'train'), row 0, column '{column}': holds a message list written as a JSON string "
        "(as a CSV cell holds one), which would be read as text, not as messages; store message lists as "
        "lists: write the data as JSON Lines or Parquet"
    )


# ---------------------------------------------------------------- mixtures
def test_a_mixture_draws_each_sources_share_with_the_seed_and_the_plan_counts_them_exactly(
    tiny_llama, tmp_path, monkeypatch, capsys
):
    # 8 rows each. samples 12: every row once and 4 drawn a second time; fraction 0.5: 4 rows; weights
    # 2 and 1: as many rows as possible in the ratio 2:1 without repeating one: 8 and 4.
    messages = read_jsonl(EXAMPLES / "messages.jsonl")
    for row in messages:  # rows of their own, none equal to a ShareGPT row
        row["messages"][-1]["content"] = f"In short: {text_of(row['messages'][-1]['content'])}"
    mixture = [
        {"dataset": str(write_jsonl(tmp_path / "messages.jsonl", messages)), "samples": 12},
        {"dataset": str(EXAMPLES / "alpaca.jsonl"), "fraction": 0.5},
        {"dataset": str(EXAMPLES / "sharegpt.jsonl"), "weight": 2},
        {"dataset": str(EXAMPLES / "text.jsonl"), "weight": 1},
    ]
    seen = record_train_sets(monkeypatch)
    out = tmp_path / "out"
    args = ["--dataset_name", "", "--dataset_mixture", json.dumps(mixture), "--eval_split", "null"]
    args += [
        "--max_seq_length",
        "256",
        "--max_steps",
        "2",
        "--global_batch_size",
        "4",
        "--save_steps",
        "0",
        "--warmup_steps",
        "0",
    ]
    args += ["--max_train_samples", "1000"]
    in_process("sft", job_args(tiny_llama, out, *args))
    [train_set] = seen
    data = load_plan(out)["data"]
    assert [(p["format"], p["rows"], p["samples"]) for p in data["train"]] == [
        ("messages", 12, 12),
        ("alpaca", 4, 4),
        ("sharegpt", 8, 8),
        ("text", 4, 1),  # 4 documents packed into one block of 256 tokens
    ]
    assert [p["share"] for p in data["train"]] == [
        {"samples": 12},
        {"fraction": 0.5},
        {"weight": 2},
        {"weight": 1},
    ]
    assert data["train_samples"] == load_plan(out)["num_samples"] == len(train_set) == 25
    assert "train data: split 'train' of" in capsys.readouterr().out
    # `recipes plan` reads the same mixture into the same plan, data record included.
    from recipes.cli import main as recipes_cli

    assert recipes_cli(["plan", *job_args(tiny_llama, out, *args), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {key: printed[key] for key in load_plan(out)} == load_plan(out)

    # The same sources and seed give the same samples in the same order; another seed another order.
    cfg = SFTConfig(dataset_mixture=mixture, eval_split=None, max_seq_length=256, seed=7)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    first, _, _ = load_sft_data(cfg, tokenizer)
    assert first["input_ids"] == train_set["input_ids"]
    other, _, _ = load_sft_data(SFTConfig(**{**cfg.__dict__, "seed": 8}), tokenizer)
    assert sorted(map(tuple, other["input_ids"])) != sorted(
        map(tuple, first["input_ids"])
    )  # other rows drawn
    # Every messages row is in the mixture at least once, four of them twice.
    drawn = [tuple(chatml_sample(tokenizer, row)[0]) for row in messages]
    counts = [list(map(tuple, first["input_ids"])).count(ids) for ids in drawn]
    assert sorted(counts) == [1] * 4 + [2] * 4


def test_mixture_evaluation_comes_from_each_sources_eval_split_or_rows_held_out_of_it(tokenizer, tmp_path):
    mixture = [
        {"dataset": str(SFT_DATA), "split": "train[:20]", "eval_split": "validation[:5]"},
        {"dataset": str(EXAMPLES / "alpaca.jsonl")},  # no validation split: eval_split_size holds out 2 rows
    ]
    cfg = SFTConfig(dataset_mixture=mixture, eval_split_size=2, max_seq_length=512)
    train_set, eval_set, report = load_sft_data(cfg, tokenizer)
    assert [(p.split, p.rows) for p in report.train] == [("train[:20]", 20), ("train", 6)]
    assert [(p.split, p.rows) for p in report.eval] == [("validation[:5]", 5), ("train", 2)]
    assert report.train_samples == len(train_set) == 26 and report.eval_samples == len(eval_set) == 7
    alpaca = [tuple(chatml_sample(tokenizer, row)[0]) for row in read_jsonl(EXAMPLES / "alpaca.jsonl")]
    held_out = set(map(tuple, eval_set["input_ids"][5:]))
    assert held_out <= set(alpaca) and not held_out & set(map(tuple, train_set["input_ids"]))


def test_a_mixture_entry_with_an_unknown_key_or_two_shares_is_refused_before_reading_data(tokenizer):
    from recipes.core.config import ConfigError

    cases = [
        (
            [{"dataset": "a.jsonl", "wieght": 1}],
            "dataset_mixture entry 0 has the unknown key 'wieght'; did you mean 'weight'?",
        ),
        (
            [{"dataset": "a.jsonl", "weight": 1, "samples": 3}],
            "dataset_mixture entry 0 gives weight and samples; give one of weight, samples or fraction",
        ),
        (
            [{"dataset": "a.jsonl", "fraction": 1.5}],
            "dataset_mixture entry 0: fraction must be a number in (0, 1], got 1.5",
        ),
        ([{"weight": 1}], "dataset_mixture entry 0 needs dataset: a Hub id, a data file or a directory"),
    ]
    for mixture, message in cases:
        with pytest.raises(ConfigError) as err:
            load_sft_data(SFTConfig(dataset_mixture=mixture), tokenizer)
        assert str(err.value) == message
    with pytest.raises(ConfigError, match=r"both dataset_name \(x.jsonl\) and dataset_mixture are set"):
        load_sft_data(SFTConfig(dataset_name="x.jsonl", dataset_mixture=[{"dataset": "a.jsonl"}]), tokenizer)


def test_a_mixture_entry_whose_dataset_is_missing_is_named_as_the_entry(tokenizer, tmp_path):
    missing = tmp_path / "no_such.jsonl"
    mixture = [{"dataset": str(EXAMPLES / "alpaca.jsonl")}, {"dataset": str(missing)}]
    with pytest.raises(DataError) as err:
        load_sft_data(SFTConfig(dataset_mixture=mixture, eval_split=None), tokenizer)
    assert str(err.value) == (
        f"dataset_mixture entry 1: dataset {missing}: no such file or directory; pass the path of a data file, "
        "a directory of split files or a save_to_disk directory (relative paths start where the run starts)"
    )


# ---------------------------------------------------------------- splits and where datasets live
@pytest.mark.parametrize("spec", ["train[:25%]", "train[10:20]", "train[-5:]", "train+validation[:3]"])
def test_split_slices_select_the_rows_datasets_selects(spec):
    ours = load_split(str(SFT_DATA), spec)
    theirs = datasets.load_dataset(str(SFT_DATA), split=spec)
    assert ours.data.to_list() == theirs.to_list()


def test_a_slice_row_error_names_the_line_in_the_file(tokenizer, tmp_path):
    rows = read_jsonl(EXAMPLES / "messages.jsonl")
    rows[6]["messages"][1]["content"] = None
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_sft_data(SFTConfig(dataset_name=str(data), train_split="train[4:]", eval_split=None), tokenizer)
    assert str(err.value).startswith(
        f"{data} (split 'train'), line 7 (row 6), column 'messages': turn 1 has no content (a missing key or a "
        "null)"
    )


def test_save_to_disk_directories_and_dataset_config_name_are_read(tmp_path):
    rows = read_jsonl(EXAMPLES / "alpaca.jsonl")
    single = datasets.Dataset.from_list(rows)
    single.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": single, "test": single.select(range(2))}).save_to_disk(
        str(tmp_path / "two")
    )
    assert load_split(str(tmp_path / "one"), "train").data.to_list() == rows
    assert load_split(str(tmp_path / "two"), "test[:1]").data.to_list() == rows[:1]
    assert sorted(load(str(tmp_path / "two")).splits) == ["test", "train"]

    # A local dataset with two configurations (README.md metadata, as on the Hub).
    repo = tmp_path / "repo"
    repo.mkdir()
    write_jsonl(repo / "short.jsonl", rows[:3])
    write_jsonl(repo / "long.jsonl", rows)
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: short\n  data_files: short.jsonl\n"
        "- config_name: long\n  data_files: long.jsonl\n---\n"
    )
    assert len(load_split(str(repo), "train", "short")) == 3
    assert load_split(str(repo), "train", "long").data.to_list() == rows


def test_eval_split_size_holds_out_rows_of_a_dataset_without_a_validation_split(tokenizer):
    cfg = SFTConfig(dataset_name=str(EXAMPLES / "messages.jsonl"), eval_split_size=0.25, max_seq_length=512)
    train_set, eval_set, report = load_sft_data(cfg, tokenizer)
    all_rows = [tuple(chatml_sample(tokenizer, row)[0]) for row in read_jsonl(EXAMPLES / "messages.jsonl")]
    assert (len(train_set), len(eval_set)) == (6, 2)
    assert sorted(map(tuple, [*train_set["input_ids"], *eval_set["input_ids"]])) == sorted(all_rows)
    again, _, _ = load_sft_data(cfg, tokenizer)
    assert again["input_ids"] == train_set["input_ids"]  # drawn with the seed
    assert report.eval_samples == 2


@pytest.mark.slow  # datasets forks worker processes
def test_dataset_num_proc_tokenises_in_parallel_to_the_same_samples(tmp_path):
    tokenizer = make_chat_tokenizer(tmp_path / "tokenizer")
    assert tokenizer.chat_template == CHATML
    rows = read_jsonl(SFT_DATA / "train.jsonl")[:64]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    one, _, _ = load_sft_data(SFTConfig(dataset_name=str(data), eval_split=None), tokenizer)
    two, _, _ = load_sft_data(
        SFTConfig(dataset_name=str(data), eval_split=None, dataset_num_proc=2), tokenizer
    )
    assert one.to_list() == two.to_list()
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": t["messages"][-1]["content"]} for t in rows])
    cfg = SFTConfig(dataset_name=str(text), eval_split=None, max_seq_length=64)
    one, _, _ = load_sft_data(cfg, tokenizer)
    two, _, _ = load_sft_data(SFTConfig(**{**cfg.__dict__, "dataset_num_proc": 2}), tokenizer)
    assert one.to_list() == two.to_list()  # blocks start where they do with one process


def test_packed_text_blocks_attend_within_each_document(tiny_llama, tokenizer):
    """The model's logits for a block of two documents equal those of each document alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    docs = [tokenizer("Paris is in France.")["input_ids"], tokenizer("Water boils.")["input_ids"]]
    block = {
        "input_ids": docs[0] + docs[1],
        "labels": docs[0] + docs[1],
        "segments": [len(docs[0]), len(docs[1])],
    }
    short = {"input_ids": docs[1], "labels": docs[1], "segments": [len(docs[1])]}
    batch = PadCollator(tokenizer.pad_token_id)([block, short])
    with torch.no_grad():
        packed = model(**causal_lm_inputs(batch)).logits
        alone = [model(input_ids=torch.tensor([d])).logits[0] for d in docs]
    # Another row length adds the attention's sums in another order: rounding, relative to the logits.
    terms = forward_terms(model.config, len(block["input_ids"]))
    tolerance = float32_tolerance(terms, packed.abs().max().item())
    assert (packed[0, : len(docs[0])] - alone[0]).abs().max() <= tolerance
    assert (packed[0, len(docs[0]) :] - alone[1]).abs().max() <= tolerance
    assert (packed[1, : len(docs[1])] - alone[1]).abs().max() <= tolerance


def test_the_readme_mixture_yaml_mixes_as_the_readme_says(tokenizer, tmp_path, monkeypatch):
    import math
    import re

    from helpers import REPO

    from recipes.core.config import parse_config

    [block] = [
        b
        for b in re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
        if "dataset_mixture" in b
    ]
    config = tmp_path / "sft_mixture.yaml"
    config.write_text(block)
    monkeypatch.chdir(REPO)  # the YAML's paths are relative to the repository, where runs start
    cfg = parse_config(SFTConfig, ["--config", str(config), "--max_seq_length", "256"])
    _, _, report = load_sft_data(cfg, tokenizer)
    example_rows = len(read_jsonl(EXAMPLES / "sharegpt.jsonl")) - 2  # eval_split_size 2 held out
    scale = min(200 / 3, example_rows / 1)  # weights 3 and 1, no row used twice
    assert [p.rows for p in report.train] == [
        math.floor(scale * 3),
        math.floor(scale),
        12,
        round(0.5 * example_rows),
    ]
    assert [(p.split, p.rows) for p in report.eval] == [
        ("validation[:40]", 40),
        ("train", 2),
        ("train", 2),
        ("train", 2),
    ]


def doubled(batch: dict, indices: list[int]) -> dict:
    return {"y": [2 * x for x in batch["x"]]}


def test_a_cached_map_result_is_reused_only_while_the_data_code_is_unchanged(tmp_path, monkeypatch):
    """datasets hashes a map body, not the functions it calls: the data code's digest is in the fingerprint,
    so a recipe update (another truncation or drop rule) never trains on results cached by older code."""
    from recipes.core.data import loading

    split = load_split(str(write_jsonl(tmp_path / "rows.jsonl", [{"x": i} for i in range(5)])), "train")

    def cache_file(split) -> str:
        mapped = loading.map_rows(split, doubled, batched=True)
        assert mapped.data["y"] == [0, 2, 4, 6, 8]
        return mapped.data.cache_files[0]["filename"]

    first = cache_file(split)
    assert cache_file(split) == first  # unchanged code: the cached result is read back
    monkeypatch.setattr(loading, "DATA_CODE", "the digest of other data code")
    assert cache_file(split) != first
