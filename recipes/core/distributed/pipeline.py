"""A Hugging Face decoder-only causal LM as a DeepSpeed pipeline: split, configure, export.

The model becomes the module list [embedding, decoder layer 0..L-1, final norm, LM head]; stages pass
(hidden_states, attention_mask) to each other and every decoder layer rebuilds its causal mask and
rotary (cos, sin) from them, exactly as the model's own forward does. Tied input/output embeddings
become one TiedLayerSpec on the first and last stage, whose gradients DeepSpeed sums.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
from pathlib import Path

import torch

# DeepSpeed picks its accelerator when it is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from recipes.core.config import ConfigError
from recipes.core.distributed import deepspeed_contract
from recipes.core.distributed.deepspeed_contract import DeepSpeedRun
from recipes.core.distributed.weights_reader import WeightsReader
from recipes.core.losses.accumulation import summed_token_loss
from recipes.core.losses.causal_lm import chunked_token_loss
from recipes.core.plan.pipeline_layout import check_pipeline_stages

# Decoder-only families whose modules follow model.{embed_tokens, layers, norm, rotary_emb} + lm_head and
# whose decoder layers take (hidden_states, attention_mask, position_embeddings, position_ids).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
TIED_KEY = "embed_tokens"


class PipelineConfigError(ConfigError):
    """A model or DeepSpeed config the pipeline recipe cannot run; the message says how to fix it."""


def check_architecture(config) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise PipelineConfigError(
            f"the pipeline splitter does not know model_type {config.model_type!r}; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Use recipes/sft.py (data parallel / ZeRO) for this model"
        )


def check_supported(cfg) -> None:
    """Refuse the recipe fields the pipeline engine cannot honour (yet), before anything starts."""
    if cfg.mixed_precision not in ("no", "bf16"):
        raise PipelineConfigError(
            f"mixed_precision {cfg.mixed_precision!r}: the pipeline recipe trains in fp32 or bf16; set no or bf16"
        )
    if cfg.torch_compile:
        raise PipelineConfigError(
            "torch_compile: the pipeline recipe does not support it yet; set torch_compile: false, or use "
            "recipes/sft.py (1 process, DDP or ZeRO-1/2/3)"
        )
    if cfg.use_peft:
        raise PipelineConfigError(
            "use_peft: the pipeline recipe does not support LoRA yet; train LoRA adapters with recipes/sft.py "
            "(1 process, DDP or ZeRO-1/2/3), or set use_peft: false"
        )
    if cfg.packing:  # pipeline stages exchange fixed-layout tensors, not position ids
        raise PipelineConfigError(
            "packing: the pipeline recipe trains padded batches only; set packing: false"
        )


class ModelSource:
    """The model built on the meta device (no memory) and its checkpoint: DeepSpeed builds only this
    process's stages from the layer specs, and each module reads its own weights from the checkpoint as it
    is built, so no process ever holds the whole model, also not while loading. repr stays short because
    DeepSpeed prints layer specs with their arguments."""

    def __init__(self, name_or_path: str, attn_implementation: str = "sdpa", trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        check_architecture(config)
        self.reader = WeightsReader(name_or_path)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(
                config, dtype=torch.float32, attn_implementation=attn_implementation
            )
        # The rotary frequencies are computed from the config, not stored: build them for real (tiny).
        rotary = self.model.model.rotary_emb
        self.model.model.rotary_emb = type(rotary)(config=self.model.config)
        self.config = self.model.config

    def weights(self, module: nn.Module, prefix: str) -> nn.Module:
        """`module` of the meta model with its weights (`prefix` in the checkpoint's names)."""
        return self.reader.materialize(module, prefix)

    def release(self) -> None:
        # Modules of other stages are freed once nothing but the specs refers to them.
        self.model = self.reader = None

    def __repr__(self) -> str:
        return "pretrained"


class EmbeddingPipe(nn.Module):
    def __init__(self, source: ModelSource):
        super().__init__()
        self.embed_tokens = source.weights(source.model.model.embed_tokens, "model.embed_tokens")

    def forward(self, inputs):
        input_ids, attention_mask = inputs
        return self.embed_tokens(input_ids), attention_mask

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"model.embed_tokens.{k}": v for k, v in self.embed_tokens.state_dict().items()}


class DecoderLayerPipe(nn.Module):
    def __init__(self, source: ModelSource, index: int):
        super().__init__()
        model = source.model
        self.layer = source.weights(model.model.layers[index], f"model.layers.{index}")
        self.rotary_emb = model.model.rotary_emb
        self.config = model.config
        self.index = index
        self.mask_fn = (
            create_sliding_window_causal_mask if _is_sliding(model.config, index) else create_causal_mask
        )

    def forward(self, inputs):
        hidden, attention_mask = inputs
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = self.mask_fn(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{_CACHE_ARGUMENT: None},  # training keeps no KV cache
        )
        cos_sin = self.rotary_emb(hidden, position_ids=position_ids)
        hidden = self.layer(
            hidden, attention_mask=mask, position_embeddings=cos_sin, position_ids=position_ids
        )
        return hidden, attention_mask

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"model.layers.{self.index}.{k}": v for k, v in self.layer.state_dict().items()}


class FinalNormPipe(nn.Module):
    def __init__(self, source: ModelSource):
        super().__init__()
        self.norm = source.weights(source.model.model.norm, "model.norm")

    def forward(self, inputs):
        hidden, _ = inputs
        return self.norm(hidden)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"model.norm.{k}": v for k, v in self.norm.state_dict().items()}


class LMHeadPipe(nn.Module):
    """The LM head; with a chunked loss it passes the hidden states on and the loss applies the head."""

    def __init__(self, source: ModelSource, chunked: bool = False):
        super().__init__()
        self.lm_head = source.weights(source.model.lm_head, "lm_head")
        self.chunked = chunked

    def forward(self, hidden):
        return hidden if self.chunked else self.lm_head(hidden)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"lm_head.{k}": v for k, v in self.lm_head.state_dict().items()}


# transformers renamed the mask functions' cache argument (past_key_values -> cache) in 5.x.
_CACHE_ARGUMENT = (
    "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
)


def _tied_head(embedding: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden, embedding.embed_tokens.weight)


def _tied_hidden(embedding: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    return hidden  # a chunked loss applies the tied head itself


def _is_sliding(config, index: int) -> bool:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[index] == "sliding_attention"
    return getattr(config, "sliding_window", None) is not None


class PipelineLoss:
    """Last-stage loss: the micro-batch's summed token loss times the scale that travels with its labels,
    from the logits, or with `chunk_tokens` from the hidden states through `head` a chunk at a time.

    For training, scale = dp x micro-batches / (target tokens of the step on all dp ranks): the engine
    divides by its micro-batch count and averages over dp ranks, which leaves exactly the step's
    token-mean loss and its gradient. For evaluation scale = 1 gives plain sums.
    """

    def __init__(self, head, chunk_tokens: int):
        self.head, self.chunk_tokens = head, chunk_tokens

    def __call__(
        self, outputs: torch.Tensor, labels_and_scale: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        labels, scale = labels_and_scale
        if self.chunk_tokens:
            summed = chunked_token_loss(outputs, labels, self.head, self.chunk_tokens)
        else:
            summed, _ = summed_token_loss(outputs, labels)
        return summed * scale


def pipe_batches(batches: list[dict], scale: float) -> list[tuple]:
    """Micro-batches as the engine takes them: inputs for the first stage, and for the last stage the
    labels with the loss scale of their step (PipelineLoss)."""
    scale_tensor = torch.tensor(scale, dtype=torch.float32)
    return [((b["input_ids"], b["attention_mask"]), (b["labels"], scale_tensor)) for b in batches]


def layer_specs(source: ModelSource, chunked: bool = False) -> list[LayerSpec]:
    """[embedding, decoder layers, final norm, LM head] as specs; tied embeddings share one TiedLayerSpec key.
    `chunked`: the head passes the hidden states to a chunked loss (PipelineLoss) instead of logits."""
    config = source.config
    if getattr(config, "tie_word_embeddings", False):
        first = TiedLayerSpec(TIED_KEY, EmbeddingPipe, source, tied_weight_attr=["embed_tokens.weight"])
        forward_fn = _tied_hidden if chunked else _tied_head
        head = TiedLayerSpec(
            TIED_KEY, EmbeddingPipe, source, forward_fn=forward_fn, tied_weight_attr=["embed_tokens.weight"]
        )
    else:
        first, head = LayerSpec(EmbeddingPipe, source), LayerSpec(LMHeadPipe, source, chunked)
    decoder = [LayerSpec(DecoderLayerPipe, source, i) for i in range(config.num_hidden_layers)]
    return [first, *decoder, LayerSpec(FinalNormPipe, source), head]


def build_pipeline(
    source: ModelSource, stages: int, loss_chunk_tokens: int = 0, checkpointing: bool = False
) -> PipelineModule:
    """Split an HF causal LM into `stages` stages, this process's built with their weights; call
    `source.release()` once the engine exists. `loss_chunk_tokens` > 0: the last stage computes the loss
    through the head in chunks (core/losses/causal_lm.py). `checkpointing`: every decoder layer is recomputed in
    backward (non-reentrant, as in the other recipes) instead of keeping its activations."""
    try:
        check_pipeline_stages(source.config.num_hidden_layers, stages)
    except ValueError as err:
        raise PipelineConfigError(str(err)) from None
    module = PipelineModule(
        layers=layer_specs(source, chunked=loss_chunk_tokens > 0),
        num_stages=stages,
        partition_method=f"type:{DecoderLayerPipe.__name__}",
        dynamic_shape=True,  # padded batches differ in length, so every send carries its shape
        activation_checkpoint_interval=1 if checkpointing else 0,
        activation_checkpoint_func=ds_checkpointing.non_reentrant_checkpoint,
        checkpointable_layers=[DecoderLayerPipe.__name__],  # the embedding, norm and head run as they are
    )
    # The loss needs the head the last stage built from its layer specs, so it comes after them.
    module.loss_fn = PipelineLoss(_local_head(module) if loss_chunk_tokens else None, loss_chunk_tokens)
    return module


def _local_head(module: PipelineModule):
    """This stage's LM head as a function of the hidden states (None on a stage without it)."""
    for layer in module.forward_funcs:
        if isinstance(layer, LMHeadPipe):
            return layer.lm_head
    if module.stage_id == module.num_stages - 1 and TIED_KEY in module.tied_modules:
        embedding = module.tied_modules[TIED_KEY]
        return functools.partial(_tied_head, embedding)
    return None


def init_deepspeed_comm() -> None:
    """Let DeepSpeed adopt the process group the launcher's environment describes (gloo without GPUs)."""
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def initialize_engine(module: PipelineModule, optimizer: torch.optim.Optimizer, ds_config: dict):
    """The PipelineEngine; the LR schedule stays in the recipe, stepped once per train_batch."""
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    return engine


def resolve_ds_config(raw: dict, run: DeepSpeedRun, where: str) -> dict:
    """The config `deepspeed.initialize` gets: `raw` (read from `where`) checked against the recipe and
    filled with its values (the DeepSpeed contract; raw deepspeed.initialize does not resolve "auto").
    Raises DeepSpeedConfigError."""
    deepspeed_contract.check(raw, run, where)
    config = copy.deepcopy(raw)
    deepspeed_contract.fill(config, run)
    if deepspeed_contract.zero_stage(config) == 0:
        # DeepSpeed's own clipping under a ZeRO-0 pipeline counts only the first stage's gradients, so there
        # the recipe clips (PipelineClipper); ZeRO-1 computes the norm over every stage and clips correctly.
        config["gradient_clipping"] = 0.0
    for precision in ("bf16", "fp16"):  # the engine gets the block of the precision it trains in only
        if config[precision]["enabled"] is False:
            del config[precision]
    return _drop_auto(config)


def _drop_auto(config: dict) -> dict:
    """Remaining "auto" entries (tuning sizes Accelerate would derive) fall back to DeepSpeed's defaults."""
    return {k: _drop_auto(v) if isinstance(v, dict) else v for k, v in config.items() if v != "auto"}


class PipelineClipper:
    """Clips the gradient norm over the whole pipeline just before each optimizer step (no ZeRO).

    Each parameter counts once: a tied embedding's copy on the last stage is skipped. Gradients are
    already summed over data-parallel ranks when the optimizer steps, so the pipe group completes the norm.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, parameters, max_norm: float, pipe_group):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.max_norm = max_norm
        self.group = pipe_group
        self.last_norm: float | None = None
        optimizer.register_step_pre_hook(self._clip)

    def _clip(self, optimizer, args, kwargs) -> None:
        grads = [
            p.grad
            for p in self.parameters
            if p.grad is not None and not getattr(p, "ds_pipe_replicated", False)
        ]
        squares = (
            torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(())
        )
        squares = squares.to(self.parameters[0].device)
        dist.all_reduce(squares, group=self.group)
        norm = squares.sqrt()
        self.last_norm = norm.item()
        coefficient = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)
        for p in self.parameters:
            if p.grad is not None:
                p.grad.detach().mul_(coefficient.to(p.grad.device))


# ---------------------------------------------------------------- export


def local_hf_state_dict(module: PipelineModule) -> dict[str, torch.Tensor]:
    """This stage's weights under the names the HF model uses (CPU copies)."""
    state = {}
    for layer in module.forward_funcs:
        if isinstance(layer, (EmbeddingPipe, DecoderLayerPipe, FinalNormPipe, LMHeadPipe)):
            state.update({name: t.detach().cpu().clone() for name, t in layer.hf_state_dict().items()})
    return state


def export_pretrained(
    module: PipelineModule, data_parallel_rank: int, config, tokenizer, directory: str | Path
) -> None:
    """Save a from_pretrained directory without gathering the model in any process: the first data-parallel
    replica of each stage writes that stage's weights as one safetensors shard, global rank 0 the shard
    index, the config and the tokenizer (their names and sizes are all it gathers)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    shard = f"model-{module.stage_id + 1:05d}-of-{module.num_stages:05d}.safetensors"
    local = local_hf_state_dict(module) if data_parallel_rank == 0 else {}
    if local:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(local, str(directory / shard), metadata={"format": "pt"})
    sizes = {name: (shard, t.numel() * t.element_size()) for name, t in local.items()}
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(sizes, gathered, dst=0)
    if dist.get_rank() != 0:
        return
    weight_map = {name: where for part in gathered for name, where in part.items()}
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    expected = set(shell.state_dict()) - ({"lm_head.weight"} if tied else set())
    if set(weight_map) != expected:
        raise RuntimeError(
            f"the stages' weights do not match the model: missing {expected - set(weight_map)}, "
            f"extra {set(weight_map) - expected}"
        )
    index = {
        "metadata": {"total_size": sum(size for _, size in weight_map.values())},
        "weight_map": {name: weight_map[name][0] for name in sorted(weight_map)},
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(directory)
    if shell.can_generate():
        shell.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
