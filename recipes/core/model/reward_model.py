"""A trained reward model (a sequence classifier with one output, such as recipes/reward.py writes) used
as a GRPO reward function: it scores each prompt + completion, read at the last token before padding as
transformers pools it.

The text it scores is built as the reward recipe tokenised its pairs: chat prompts with the completion as
the assistant's turn through the chat template, plain prompts followed by the completion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from recipes.core.config import ConfigError


class RewardModel:
    """`reward_model(prompts=..., completions=..., **columns)`: one score per completion, with the signature
    of a reward function."""

    def __init__(self, name_or_path: str, trust_remote_code: bool = False, batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, dtype=torch.float32, trust_remote_code=trust_remote_code
        ).eval()
        outputs = self.model.config.num_labels
        if outputs != 1:
            raise ConfigError(
                f"reward_funcs entry {name_or_path!r} is a classifier with {outputs} outputs; a reward model "
                "has one (a score): train one with recipes/reward.py, or name a function as module:function"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        pad = self.model.config.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.batch_size = batch_size
        self.__name__ = name_or_path  # how errors name it, as a function's name

    def ids(self, prompt: Any, completion: Any) -> list[int]:
        """The tokens scored for one completion (module docstring)."""
        if isinstance(prompt, list):  # chat turns; the completion as TRL hands it: the assistant's turns
            turns = (
                completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
            )
            return self.tokenizer.apply_chat_template([*prompt, *turns], tokenize=True, return_dict=True)[
                "input_ids"
            ]
        return self.tokenizer(prompt + completion, add_special_tokens=True)["input_ids"]

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        if torch.cuda.is_available() and next(self.model.parameters()).device.type == "cpu":
            self.model.to(torch.cuda.current_device())  # loaded before the Accelerator chose this rank's GPU
        device = next(self.model.parameters()).device
        sequences = [self.ids(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            width = max(map(len, chunk))
            input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, ids in enumerate(chunk):  # right-padded, as the reward recipe trained
                input_ids[i, : len(ids)], attention_mask[i, : len(ids)] = torch.tensor(ids), 1
            logits = self.model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
            ).logits
            scores.extend(logits[:, 0].float().tolist())
        return scores
