"""The memory census (core/train/memory_census.py) counts every storage once, under what holds it; its probe
(core/train/probes.py) takes each census at its point of the loop; and the ZeRO-3 values the recipe fills
from the model (core/distributed/deepspeed_contract.py fill_model_values)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from recipes.core.distributed.deepspeed_contract import fill_model_values, largest_layer_parameters
from recipes.core.train.memory_census import CATEGORIES, MODEL_STATES, take_census, tensors_with_grad
from recipes.core.train.probes import MemoryCensus


def grown(before, after) -> dict[str, int]:
    return {c: after.bytes[c] - before.bytes[c] for c in CATEGORIES}


def test_census_files_each_storage_once_under_what_holds_it():
    before = take_census()
    # Two parameters as views into one flat buffer (as ZeRO-1/2 keep them): one storage of 300 floats.
    flat = torch.zeros(300)
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(flat[:100].view(10, 10))
    model.b = torch.nn.Parameter(flat[100:])
    model.register_buffer("freqs", torch.zeros(7))
    # An optimizer stepping on fp32 copies that are not the model's parameters: master weights.
    master = [p.detach().clone().requires_grad_() for p in (model.a, model.b)]
    optimizer = torch.optim.Adam(master)
    for p, m in zip((model.a, model.b), master, strict=True):
        p.grad = torch.ones_like(p)
        m.grad = p.grad  # the same storage: counted once
    optimizer.step()
    held = torch.zeros(10_000_000)  # 40 MB no category claims
    after = take_census()

    assert grown(before, after) == {
        "gathered_parameters": 0,
        "persistent_parameters": 0,
        "parameters": 300 * 4,
        "master_weights": 300 * 4,
        "optimizer_states": 2 * 300 * 4 + 2 * 4,  # Adam's two moments and a step counter per tensor
        "communication_buckets": 0,
        "gradients": 300 * 4,
        "buffers": 7 * 4,
        "other": held.numel() * 4,
    }
    assert after.model_states - before.model_states == sum(grown(before, after)[c] for c in MODEL_STATES)
    assert after.largest_other[0] == ("unnamed tensor", held.numel() * 4)


def test_ddp_buckets_are_counted_once_with_the_gradients_that_are_views_into_them(tmp_path):
    # DDP keeps a gradient of every parameter in all-reduce buckets that only C++ references. After a
    # synchronising backward the gradients are views into them (gradient_as_bucket_view): one copy. A
    # backward under no_sync (accumulation) makes gradients of their own next to the buckets: two.
    created = not dist.is_initialized()
    if created:
        store = dist.FileStore(str(tmp_path / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
        n = sum(p.numel() for p in model.parameters())
        before = take_census()
        ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        ddp(torch.randn(4, 64)).sum().backward()
        synced = take_census()
        for p in ddp.parameters():
            p.grad = None
        released = take_census()
        with ddp.no_sync():
            ddp(torch.randn(4, 64)).sum().backward()
        accumulating = take_census()
    finally:
        if created:
            dist.destroy_process_group()
    both = ("gradients", "communication_buckets")
    assert [grown(before, synced)[c] for c in both] == [0, 4 * n]
    assert [grown(before, released)[c] for c in both] == [0, 4 * n]
    assert [grown(before, accumulating)[c] for c in both] == [4 * n, 4 * n]


def test_the_census_probe_counts_at_loading_the_loop_start_and_around_the_second_step():
    """Loaded model, loop start, the end of step 2's forward and of its backward, and after step 2: at
    each point the census holds exactly the model's parameters, plus its gradients once backward ran."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)  # 272 parameters
    params = 4 * 272
    probe = MemoryCensus()
    probe.model_loaded()
    probe.loop_started(start_step=0, last_step=3)
    seen = {}
    for step in (1, 2, 3):
        probe.step_starting(step, model)
        model(torch.ones(2, 16)).sum().backward()
        seen[step] = sorted(probe.censuses)
        probe.step_done(step)
        model.zero_grad(set_to_none=True)
    assert seen[1] == ["loaded", "start"]  # step 1 is not counted
    assert seen[2] == ["backward", "forward", "loaded", "start"]
    assert sorted(probe.censuses) == ["after_step", "backward", "forward", "loaded", "start"]
    grown_by = {point: grown(probe.censuses["loaded"], census) for point, census in probe.censuses.items()}
    assert grown_by["forward"]["gradients"] == 0 and grown_by["backward"]["gradients"] == params
    assert probe.censuses["backward"].bytes["parameters"] == probe.censuses["loaded"].bytes["parameters"]
    assert probe.censuses["loaded"].bytes["parameters"] >= params


def test_the_backward_census_hooks_onto_every_output_tensor_with_a_gradient():
    hidden = (torch.ones(2, requires_grad=True), torch.ones(2))
    logits = torch.empty(0, requires_grad=True)  # logits_to_keep=0: the loss never uses them
    output = CausalLMOutputWithPast(logits=logits, hidden_states=hidden)
    assert [id(t) for t in tensors_with_grad(output)] == [id(logits), id(hidden[0])]


def tiny_llama_on_meta():
    config = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=500,
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_zero3_auto_values_come_from_the_largest_layer():
    model = tiny_llama_on_meta()
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert largest_layer_parameters(model) == layer
    config = {
        "zero_optimization": {
            "stage": 3,
            "stage3_max_live_parameters": "auto",
            "stage3_max_reuse_distance": "auto",
        }
    }
    fill_model_values(config, model)
    assert config["zero_optimization"]["stage3_max_live_parameters"] == 2 * layer
    assert config["zero_optimization"]["stage3_max_reuse_distance"] == layer
    # Numbers a user wrote stay; other stages have nothing to fill.
    mine = {
        "zero_optimization": {"stage": 3, "stage3_max_live_parameters": 7, "stage3_max_reuse_distance": 5}
    }
    fill_model_values(mine, model)
    assert mine["zero_optimization"] == {
        "stage": 3,
        "stage3_max_live_parameters": 7,
        "stage3_max_reuse_distance": 5,
    }
    zero2 = {"zero_optimization": {"stage": 2, "stage3_max_reuse_distance": "auto"}}
    fill_model_values(zero2, model)
    assert zero2["zero_optimization"]["stage3_max_reuse_distance"] == "auto"
