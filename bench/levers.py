"""What each memory and speed lever is worth on a model with a real large vocabulary.

    python -m bench --sections levers            # as a section of the benchmark
    python -m bench.levers loss --chunk 1024     # one isolated measurement (prints JSON)

The model is Qwen2.5-0.5B-shaped (24 layers, width 896, a 151,936-token vocabulary, tied embeddings),
randomly initialised: the shapes decide memory and speed, the weights do not. The data are long
conversations cut from the bundled SFT data, so that every sample fills max_seq_length.

Two measurements isolate one thing each, in a fresh process, as the growth of the process's peak memory
(resident set on a CPU, allocated on a GPU) over what it held before: the loss alone (last hidden states of one sequence through the LM head,
forward and backward, all logits at once against the chunked loss), and one forward and backward of the
model (activation memory, with and without activation checkpointing; the gradients' own bytes are
subtracted). The recipe runs then train the same job with each lever added in turn and report the
training loop's peak memory, throughput and model FLOP/s (MFU with `--gpu`), next to `recipes plan`'s
memory estimate for that run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

QWEN_05B = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151_936,
    "max_position_embeddings": 32_768,
    "tie_word_embeddings": True,
    "rope_theta": 1_000_000.0,
}
CHUNK = 256  # the recipe's default loss_chunk_tokens
# name: the recipe fields each run adds, in the order the levers are added
FP32 = {"mixed_precision": "no"}  # whatever the job's precision on this device
CONFIGS = {
    "baseline (all logits)": {"loss_chunk_tokens": 0, **FP32},
    "+ chunked loss": {"loss_chunk_tokens": CHUNK, **FP32},
    "+ gradient checkpointing": {"loss_chunk_tokens": 0, "gradient_checkpointing": True, **FP32},
    "+ both": {"loss_chunk_tokens": CHUNK, "gradient_checkpointing": True, **FP32},
    "+ both + bf16": {"loss_chunk_tokens": CHUNK, "gradient_checkpointing": True, "mixed_precision": "bf16"},
    "+ both + bf16 + compile": {
        "loss_chunk_tokens": CHUNK,
        "gradient_checkpointing": True,
        "mixed_precision": "bf16",
        "torch_compile": True,
        "pad_to_multiple_of": 128,
    },
}


def qwen_shaped_model(directory: Path, tokenizer_from: str, layers: int = 24) -> Path:
    """A random Qwen2.5-0.5B-shaped model (with `layers` layers) saved with a chat tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (directory / "model.safetensors").is_file():
        return directory
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    spec = {**QWEN_05B, "num_hidden_layers": layers}
    config = AutoConfig.for_model(
        spec.pop("model_type"),
        **spec,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def long_conversations(directory: Path, source: Path, tokenizer_from: str, tokens: int, count: int) -> Path:
    """`count` conversations of at least `tokens` tokens, each the turns of consecutive bundled samples."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    rows = [json.loads(line) for line in (source / "train.jsonl").read_text().splitlines()]
    conversations, turns, i = [], [], 0
    while len(conversations) < count:
        turns += [t for t in rows[i % len(rows)]["messages"] if t["role"] != "system"]
        i += 1
        rendered = tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True)
        if len(rendered["input_ids"]) >= tokens:
            conversations.append({"messages": turns})
            turns = []
    directory.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(c) + "\n" for c in conversations)
    (directory / "train.jsonl").write_text(text)
    (directory / "validation.jsonl").write_text(text.splitlines(keepends=True)[0])
    return directory


def _grown(before: int, device: torch.device) -> int:
    from recipes.core.train.usage import peak_memory_bytes

    return peak_memory_bytes(device) - before


def measure_loss(
    hidden_size: int, vocab_size: int, tokens: int, chunk_tokens: int, device: str = "cpu"
) -> dict:
    """Peak memory growth of the loss alone: the last hidden states of `tokens` positions through an LM head,
    forward and backward, as the recipe computes it: every logit at once (chunk_tokens 0) or a chunk of
    target positions at a time. Every position is a target, the most logits a batch can need."""
    from recipes.core.losses.accumulation import summed_token_loss
    from recipes.core.losses.causal_lm import chunked_token_loss
    from recipes.core.train.usage import peak_memory_bytes, reset_peak_memory

    torch.manual_seed(0)
    dev = torch.device(device)
    head = torch.nn.Linear(hidden_size, vocab_size, bias=False, device=dev)
    hidden = torch.randn(1, tokens + 1, hidden_size, device=dev, requires_grad=True)
    labels = torch.randint(0, vocab_size, (1, tokens + 1), device=dev)
    reset_peak_memory(dev)
    before = peak_memory_bytes(dev)
    if chunk_tokens:
        loss = chunked_token_loss(hidden, labels, head, chunk_tokens)
    else:
        loss, _ = summed_token_loss(head(hidden), labels)
    loss.backward()
    gradients = sum(t.grad.numel() * t.grad.element_size() for t in (hidden, head.weight))
    return {
        "peak_growth_bytes": _grown(before, dev) - gradients,
        "gradient_bytes": gradients,
        "loss": loss.item(),
    }


def measure_activations(model_dir: str, tokens: int, checkpointing: bool, device: str = "cpu") -> dict:
    """Peak memory growth of one forward and backward of a `tokens`-token sequence through the model's
    layers (the decoder without its head: the loss is the lever measured above), less the bytes of the
    gradients it allocates: the activations kept for backward."""
    from transformers import AutoModelForCausalLM

    from recipes.core.model.pretrained import enable_activation_checkpointing
    from recipes.core.train.usage import peak_memory_bytes, reset_peak_memory

    dev = torch.device(device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev)
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    input_ids = torch.randint(0, 1000, (1, tokens), device=dev)
    reset_peak_memory(dev)
    before = peak_memory_bytes(dev)
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    hidden.float().square().mean().backward()
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return {"peak_growth_bytes": _grown(before, dev) - gradients, "gradient_bytes": gradients}


def isolated(kind: str, **kwargs) -> dict:
    """One isolated measurement in a fresh process (its own peak resident memory)."""
    from bench.job import run

    with tempfile.TemporaryDirectory() as out:
        result = Path(out) / "result.json"
        args = [f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items()]
        run([sys.executable, "-m", "bench.levers", kind, *args, "--out", str(result)], {})
        return json.loads(result.read_text())


def levers(
    job,
    model: Path,
    data: Path,
    seq_len: int,
    steps: int,
    device: str = "cpu",
    device_name: str | None = None,
) -> dict:
    """The section: the isolated loss and activation measurements, then the recipe runs; with a known
    `device_name` (`recipes plan --gpu` terms), each run's MFU."""
    from bench.job import run_recipe
    from bench.measures import mfu, model_flops_per_second
    from recipes.core.model.shape import model_shape
    from recipes.core.plan.activations import Levers
    from recipes.core.plan.hardware import get_device
    from recipes.core.plan.memory import device_memory
    from recipes.core.plan.workload import MicroBatch

    shape = model_shape(str(model))
    out: dict = {"model": {"parameters": shape.total_params, "shape": "Qwen2.5-0.5B", **QWEN_05B}}
    out["seq_len"], out["steps"], out["device"] = seq_len, steps, device_name or device
    print("  levers: loss memory", file=sys.stderr, flush=True)
    tokens = 4 * seq_len  # a micro-batch of 4 sequences
    loss = {
        name: isolated(
            "loss", hidden_size=shape.hidden_size, vocab_size=shape.vocab_size, tokens=tokens, chunk=chunk,
            device=device,
        )
        for name, chunk in (("all logits", 0), ("chunked", CHUNK))
    }  # fmt: skip
    loss["tokens"], loss["chunk_tokens"] = tokens, CHUNK
    loss["reduction"] = loss["all logits"]["peak_growth_bytes"] / loss["chunked"]["peak_growth_bytes"]
    out["loss_memory"] = loss
    print("  levers: activation memory", file=sys.stderr, flush=True)
    activations = {
        name: isolated("activations", model=str(model), tokens=2 * seq_len, checkpointing=on, device=device)
        for name, on in (("kept", False), ("checkpointed", True))
    }
    activations["tokens"] = 2 * seq_len
    activations["reduction"] = (
        activations["kept"]["peak_growth_bytes"] / activations["checkpointed"]["peak_growth_bytes"]
    )
    out["activation_memory"] = activations
    runs = {}
    for name, fields in CONFIGS.items():
        print(f"  levers: {name}", file=sys.stderr, flush=True)
        configured = job.replace(
            model=str(model), dataset=str(data), samples=steps, micro_batch=1, gradient_accumulation=1,
            max_seq_length=seq_len, **fields,
        )  # fmt: skip
        result = run_recipe(configured)
        steady = result["step_times"][1:] or result["step_times"]  # the first step warms up (and compiles)
        precision = {"no": "fp32"}.get(configured.mixed_precision, configured.mixed_precision)
        estimate = device_memory(
            shape, MicroBatch(1, seq_len), precision, autocast=True,
            levers=Levers(configured.gradient_checkpointing, configured.loss_chunk_tokens),
        ).total  # fmt: skip
        peak = result["peak_memory_mib_per_process"][0] * 2**20
        # every sample fills max_seq_length, so each step (a micro-batch of one) trains seq_len tokens
        flops_per_s = model_flops_per_second(shape, seq_len, seq_len, statistics.median(steady))
        peak_flops = get_device(device_name).peak_flops.get(precision) if device_name else None
        runs[name] = {
            "fields": fields,
            "peak_memory_bytes": peak,
            "tokens_per_second": statistics.mean(result["step_tokens"][1:] or result["step_tokens"]) / statistics.median(steady),
            "model_tflops_per_second": flops_per_s / 1e12,
            "mfu": mfu(flops_per_s, peak_flops) if peak_flops else None,
            "plan_estimate_bytes": estimate,
            "estimate_over_measured": estimate / peak,
        }  # fmt: skip
    out["runs"] = runs
    base, compiled = runs["+ both + bf16"], runs["+ both + bf16 + compile"]
    out["compile_speedup"] = compiled["tokens_per_second"] / base["tokens_per_second"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.levers")
    parser.add_argument("kind", choices=("loss", "activations"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--vocab-size", type=int)
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--chunk", type=int, default=0)
    parser.add_argument("--model")
    parser.add_argument("--checkpointing", choices=("True", "False"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.kind == "loss":
        result = measure_loss(args.hidden_size, args.vocab_size, args.tokens, args.chunk, args.device)
    else:
        result = measure_activations(args.model, args.tokens, args.checkpointing == "True", args.device)
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
