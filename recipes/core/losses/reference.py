"""The reference model of preference tuning, and the summed log-probabilities of a batch's sequences that the
DPO recipe takes from it and from the policy.

The reference is one of:
- a frozen copy (of ref_model_name_or_path, or of the starting model): never trained, in eval mode, in the
  run's precision. Under Accelerate it sits on each process's device; under DeepSpeed ZeRO-1/2 it is cast to
  the engine's compute precision like the policy; under ZeRO-3 an inference engine of its own partitions it
  over the ranks (as the policy is), so no rank holds it whole.
- the policy with its LoRA adapter disabled (use_peft without ref_model_name_or_path): the frozen pretrained
  weights are the reference, and no second copy exists.
- with precompute_ref_log_probs, either of these, or the policy itself before its first step, run once over
  the train and eval pairs before training (and before a checkpoint is loaded, so on the starting weights);
  the results are stored as columns of the datasets and travel with each batch, and nothing of the
  reference is in memory during training.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from recipes.core.data.chat import causal_lm_inputs
from recipes.core.data.preferences import REF_COLUMNS
from recipes.core.losses.causal_lm import CausalLMLoss
from recipes.core.losses.completions import token_logps
from recipes.core.model.pretrained import load_pretrained


def sequence_logps(model: Any, loss_of: CausalLMLoss, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of each sequence's target tokens (differentiable when gradients are on)."""
    inputs = causal_lm_inputs({key: value for key, value in batch.items() if key != "ref_logps"})
    outputs = model(**inputs, **loss_of.model_kwargs)
    return -loss_of.sequence_losses(outputs, batch["labels"])[0]


@contextlib.contextmanager
def evaluating(model: Any) -> Iterator[None]:
    """The model in eval mode (no dropout) and without gradients, then back in the mode it was in."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)


@dataclasses.dataclass
class Reference:
    """`reference(batch)`: the reference's summed log-probability of every sequence of a pair batch, read from
    the batch where precomputed."""

    logps_of: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    description: str
    model: Any = None  # a frozen copy, if there is one

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        return self.logps_of(batch)

    def precompute(
        self, accelerator: Any, dataset: datasets.Dataset, collate: Callable, batch_size: int
    ) -> datasets.Dataset:
        """`dataset` with the reference's log-probabilities of chosen and rejected as columns, computed in
        one pass over it spread over the processes (gathered in dataset order, duplicates dropped)."""
        loader = accelerator.prepare(DataLoader(dataset, batch_size=batch_size, collate_fn=collate))
        gathered = []
        for batch in loader:
            pairs = self.logps_of(batch).view(2, -1).T  # one row per pair: chosen, rejected
            gathered.append(accelerator.gather_for_metrics(pairs.contiguous()).cpu())
        values = torch.cat(gathered).double()  # float32 values, held exactly
        assert len(values) == len(dataset), (len(values), len(dataset))
        for column, side in zip(REF_COLUMNS, values.T, strict=True):
            dataset = dataset.add_column(column, side.tolist())
        return dataset

    def release(self) -> None:
        """Free the frozen copy (once its log-probabilities are precomputed)."""
        if hasattr(self.model, "destroy"):  # a DeepSpeed engine: its hooks and partitions
            self.model.destroy()
        self.model = self.logps_of = None


def build_reference(cfg: Any, accelerator: Any, policy: Any, policy_loss: CausalLMLoss) -> Reference:
    """The run's reference (see the module docstring); `policy` is the prepared model, untrained yet."""

    def disabled_adapter_logps(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with accelerator.unwrap_model(policy).disable_adapter(), evaluating(policy):
            return sequence_logps(policy, policy_loss, batch)

    def starting_policy_logps(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with evaluating(policy):
            return sequence_logps(policy, policy_loss, batch)

    if cfg.use_peft and not cfg.ref_model_name_or_path:
        return Reference(disabled_adapter_logps, "the policy with its LoRA adapter disabled")
    if cfg.precompute_ref_log_probs and not cfg.ref_model_name_or_path:
        return Reference(starting_policy_logps, "the starting model, before the first step")
    path = cfg.ref_model_name_or_path or cfg.model_name_or_path
    frozen = load_pretrained(
        AutoModelForCausalLM,
        dataclasses.replace(cfg, model_name_or_path=path, gradient_checkpointing=False, torch_compile=False),
    )
    frozen.requires_grad_(False)
    loss_of = CausalLMLoss(frozen, cfg.loss_chunk_tokens, accelerator.autocast)
    placed = place_frozen(frozen, accelerator)

    def copy_logps(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # autocast as the prepared policy's forward has it (none under DeepSpeed)
        with evaluating(placed), accelerator.autocast():
            return sequence_logps(placed, loss_of, batch)

    return Reference(copy_logps, f"a frozen copy of {path}", placed)


def token_reference(cfg: Any, accelerator: Any, policy: Any) -> Callable[[dict], torch.Tensor]:
    """GRPO's reference: completion inputs -> its token log-probabilities (core/losses/completions.py): the
    policy with its adapter disabled (use_peft, no ref_model_name_or_path), else a frozen copy of
    ref_model_name_or_path or the starting model, placed where the policy is (place_frozen)."""
    if cfg.use_peft and not cfg.ref_model_name_or_path:

        def disabled_adapter(inputs: dict) -> torch.Tensor:
            with accelerator.unwrap_model(policy).disable_adapter(), evaluating(policy):
                return token_logps(policy, inputs, cfg.temperature)

        return disabled_adapter
    path = cfg.ref_model_name_or_path or cfg.model_name_or_path
    frozen = load_pretrained(
        AutoModelForCausalLM,
        dataclasses.replace(cfg, model_name_or_path=path, gradient_checkpointing=False, torch_compile=False),
    )
    frozen.requires_grad_(False)
    placed = place_frozen(frozen, accelerator)

    def frozen_copy(inputs: dict) -> torch.Tensor:
        with evaluating(placed), accelerator.autocast():
            return token_logps(placed, inputs, cfg.temperature)

    return frozen_copy


def place_frozen(model: torch.nn.Module, accelerator: Any) -> Any:
    """A frozen model where the run's policy is: on the device (Accelerate), in the engine's compute
    precision (ZeRO-1/2), or partitioned by an inference engine of its own (ZeRO-3)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return model.to(accelerator.device)
    config = plugin.deepspeed_config
    zero = config.get("zero_optimization", {})
    if zero.get("stage") == 3:
        import deepspeed

        # Partitioning only: no optimizer or scheduler (a frozen model has nothing to train).
        config = {k: copy.deepcopy(v) for k, v in config.items() if k not in ("optimizer", "scheduler")}
        config["zero_optimization"] = {k: v for k, v in zero.items() if k != "offload_optimizer"}
        engine, *_ = deepspeed.initialize(model=model, config=config)
        return engine
    dtype = next(
        (dtype for key, dtype in _DTYPES.items() if config.get(key, {}).get("enabled") is True), None
    )
    model.to(accelerator.device)
    if dtype is not None:  # the parameters only, as the engine casts the policy's: buffers such as the
        for parameter in model.parameters():  # rotary frequencies stay fp32
            parameter.data = parameter.data.to(dtype)
    return model


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
