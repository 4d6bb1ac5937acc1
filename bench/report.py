"""The README's benchmark table, rendered from a results file so that every figure in it comes from one."""

from __future__ import annotations


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ratio(r: dict) -> str:
    return f"{r['median']:.3f} ({r['min']:.3f}–{r['max']:.3f})"


def render_table(results: dict) -> str:
    """Markdown: what was measured, the figure (median, min–max over repetitions), the target."""
    machine, rows = results["machine"], []
    comparison = results.get("throughput")
    if comparison:
        tps = comparison["tokens_per_second"]
        rows += [
            ("Recipe / bare PyTorch loop, tokens/s", _ratio(comparison["loop_overhead"]), ">= 0.97"),
            ("Recipe / transformers Trainer, tokens/s", _ratio(comparison["vs_trainer"]), ">= 1.0"),
            ("Recipe with packing / Trainer, tokens/s", _ratio(comparison["vs_trainer_packing"]), "reported"),
            (
                "Target tokens/s: recipe, packed, bare, Trainer",
                ", ".join(f"{tps[k]:.0f}" for k in ("recipe", "recipe_packed", "bare", "trainer")),
                "",
            ),
        ]
        if "lora" in comparison:
            lora = comparison["lora"]
            mem = lora["peak_memory_mib"]
            rows += [
                ("LoRA / full fine-tuning, tokens/s", _ratio(lora["speedup"]), "reported"),
                (
                    "Peak memory, full vs LoRA",
                    f"{mem['recipe'] / 1024:.2f} GiB vs {mem['recipe_lora'] / 1024:.2f} GiB",
                    "reported",
                ),
            ]
    padding = results.get("padding")
    if padding:
        for name, label in (("bundled_sft", "bundled SFT data"), ("long_tailed", "long-tailed lengths")):
            p = padding[name]
            rows.append(
                (
                    f"Real-token fraction, {label} (micro-batch {padding['micro_batch']})",
                    f"padded {_pct(p['padded'])}, packed {_pct(p['packed'])}",
                    ">= 95%",
                )
            )
    plan = results.get("plan")
    if plan:
        rows.append(
            (
                f"`recipes plan --calibrate {plan['calibration_steps']}` vs measured step time",
                f"{plan['predicted_step_seconds']:.1f} s vs {plan['measured_step_seconds']:.1f} s "
                f"({100 * plan['error']:+.1f}%)",
                "within 10%",
            )
        )
    scale = results.get("scale")
    if scale:
        for name, t in scale["topologies"].items():
            mem = "/".join(f"{m / 1024:.2f}" for m in t["peak_memory_mib_per_process"])
            planned = t.get("planned_memory_gib_per_device")
            plan = "" if planned is None else f" (plan: {planned:.2f} GiB)"
            rows.append(
                (
                    f"{name}, {scale['model_parameters'] / 1e6:.0f}M-parameter model: peak GiB per process, s/step",
                    f"{mem} GiB{plan}, {t['seconds_per_step']:.2f} s",
                    "reported",
                )
            )
    rows += _zero_rows(results.get("zero"))
    pipe = results.get("pipeline")
    if pipe:
        for name, r in pipe["runs"].items():
            setup, loop = (
                "/".join(f"{m / 1024:.2f}" for m in r[k])
                for k in ("setup_peak_mib_per_process", "loop_peak_mib_per_process")
            )
            rows.append(
                (
                    f"{name}, {pipe['model_parameters'] / 1e6:.0f}M-parameter model: peak GiB per process while loading; in the loop",
                    f"{setup}; {loop}",
                    "falls with stages",
                )
            )
    tok = results.get("tokenization")
    if tok:
        rows.append(
            (
                f"Tokenisation of {tok['samples']} chat samples (datasets.map, batched)",
                f"{tok['samples_per_second_cold']:.0f} samples/s; cached rerun {tok['cached_seconds']:.2f} s "
                f"(saves {tok['seconds_saved_by_cache']:.2f} s)",
                "reported",
            )
        )
    flops = results.get("model_flops")
    if flops:
        achieved = ", ".join(
            f"{1000 * flops[n]['model_tflops_per_second']:.1f}" for n in ("recipe", "recipe_packed")
        )
        rows.append(("Model GFLOP/s, recipe padded and packed", achieved, "reported"))
        if flops.get("device"):
            mfus = ", ".join(_pct(flops[n]["mfu"]) for n in ("recipe", "recipe_packed"))
            rows.append((f"MFU on {flops['device']}, recipe padded and packed", mfus, "reported"))
    rows += _lever_rows(results.get("levers"))
    rows += _qlora_rows(results.get("qlora"))
    rows += _grpo_rows(results.get("grpo"))
    lines = [
        f"Measured on {machine['description']} ({results['date']}), {results['repeats']} repetitions.",
        "",
        "| Measure | Result: median (min–max) | Target |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
    ]
    return "\n".join(lines)


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def _lever_rows(levers: dict | None) -> list[tuple[str, str, str]]:
    if not levers:
        return []
    model = f"{levers['model']['parameters'] / 1e6:.0f}M-parameter {levers['model']['shape']}-shaped model"
    loss, act = levers["loss_memory"], levers["activation_memory"]
    rows = [
        (
            f"Loss peak memory, {loss['tokens']} tokens x {levers['model']['vocab_size']:,} vocabulary: all logits vs "
            f"chunks of {loss['chunk_tokens']}",
            f"{_gib(loss['all logits']['peak_growth_bytes'])} vs {_gib(loss['chunked']['peak_growth_bytes'])} "
            f"({loss['reduction']:.1f}x less)",
            ">= 4x less",
        ),
        (
            f"Activation memory, {model}, {act['tokens']} tokens: kept vs checkpointed",
            f"{_gib(act['kept']['peak_growth_bytes'])} vs {_gib(act['checkpointed']['peak_growth_bytes'])} "
            f"({act['reduction']:.1f}x less)",
            ">= 2x less",
        ),
    ]
    for name, run in levers["runs"].items():
        mfu = f", MFU {run['mfu']:.1%}" if run.get("mfu") is not None else ""
        rows.append(
            (
                f"{model}, {levers['seq_len']} tokens, {name}: peak memory, tokens/s, plan estimate / peak",
                f"{_gib(run['peak_memory_bytes'])}, {run['tokens_per_second']:.0f}, {run['estimate_over_measured']:.2f}{mfu}",
                "estimate within 25%",
            )
        )
    rows.append(
        ("torch.compile speed, bf16 with both levers", f"{levers['compile_speedup']:.2f}x", "reported")
    )
    return rows


def _grpo_rows(grpo: dict | None) -> list[tuple[str, str, str]]:
    if not grpo:
        return []
    ours, theirs = grpo["recipe"], grpo["trl"]
    return [
        (
            f"GRPO default job, TRL {grpo['trl_version']} GRPOTrainer / recipe, seconds per step",
            f"{grpo['trl_step_seconds_over_recipe']:.2f}x ({theirs['step_seconds']:.1f} s vs {ours['step_seconds']:.1f} s)",
            "reported",
        ),
        (
            "GRPO sampling per generation batch, TRL / recipe; generated tokens/s, TRL vs recipe",
            f"{grpo['trl_generation_seconds_over_recipe']:.2f}x; {theirs['generated_tokens_per_second']:.0f} vs "
            f"{ours['generated_tokens_per_second']:.0f}",
            "reported",
        ),
    ]


def _qlora_rows(qlora: dict | None) -> list[tuple[str, str, str]]:
    if not qlora:
        return []
    model = f"{qlora['model']['parameters'] / 1e6:.0f}M-parameter {qlora['model']['shape']}-shaped model"
    return [
        (
            f"{model}, {qlora['seq_len']} tokens, {name}: peak memory, tokens/s, plan estimate / peak",
            f"{_gib(run['peak_memory_bytes'])}, {run['tokens_per_second']:.0f}, {run['estimate_over_measured']:.2f}",
            "estimate within 25%",
        )
        for name, run in qlora["runs"].items()
    ]


def _zero_rows(zero: dict | None) -> list[tuple[str, str, str]]:
    """Per topology: model-state GiB per process counted from the tensors, the plan's, their ratio (with
    the host-side part of offload rows), and the peak resident set."""
    if not zero:
        return []
    rows = []
    for name, t in zero["topologies"].items():
        measured = max(t["model_state_bytes_per_process"])
        host = ""
        if t.get("host_side_bytes_per_process"):
            host = (
                f", of which host {_gib(max(t['host_side_bytes_per_process']))} vs "
                f"{_gib(t['planned_offloaded_bytes'])}"
            )
        peak = "/".join(f"{m / 1024:.2f}" for m in t["peak_memory_mib_per_process"])
        rows.append(
            (
                f"{name}, {zero['model_parameters'] / 1e6:.0f}M-parameter model: model states per process "
                "(tensor census) vs plan; peak resident set",
                f"{_gib(measured)} vs {_gib(t['planned_model_state_bytes'])} (plan / measured "
                f"{t['plan_over_measured']:.2f}){host}; {peak} GiB",
                "plan within 20%",
            )
        )
    return rows
