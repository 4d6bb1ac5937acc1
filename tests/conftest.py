"""Session-wide pieces of the suite: the tiny models, the shared job's reference run on every topology
(made once, on first use, whichever test module asks first), and the rule that a test which starts a
process is marked slow, so that `pytest -m "not slow"` starts none."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import matplotlib.font_manager  # noqa: F401  (see below)
import pytest
from helpers import (
    OFFLINE,
    PIPELINE,
    PIPELINE_CONFIG,
    SFT_CONFIG,
    TWO_PROCESSES,
    WARM_LAUNCHES,
    classify_args,
    in_process,
    job_args,
    launch,
    make_tiny_decoder,
    make_tiny_encoder,
    write_uneven_splits,
)

os.environ.update(OFFLINE)  # recipes run in this process too
# matplotlib.font_manager, imported above, lists the system fonts with a process (fc-list) the first time
# it runs on a machine: here, not inside a fast test that draws curves.png.

# The shared job (helpers.JOB) on each topology: (accelerate config, or None to run in this process;
# recipe; extra arguments). Every one takes the same 12 steps on the same samples, so each is the
# reference of the others: one process at micro batch 2 (GA 4) and 8 (GA 1), DDP, every shipped
# ZeRO config and FSDP2 on 2 processes (GA 2), and a 2-stage pipeline (GA 4). The DDP and ZeRO-1/2/3
# references also count their model-state bytes (memory_census, CENSUS_REFERENCES); the runs tests make
# from their arguments do not: the census only reads tensors (runs without it equal these bit for bit,
# which the tests comparing them hold), and its five heap walks cost 2 to 3 s a run.
CENSUS = ["--memory_census", "true"]
CENSUS_REFERENCES = {"ddp", "zero1", "zero2", "zero3"}
REFERENCES = {
    "1proc": (None, "sft", ["--report_to", "tensorboard"]),
    "big_batch": (None, "sft", ["--per_device_train_batch_size", "8", "--save_steps", "0"]),
    "ddp": (TWO_PROCESSES, "sft", []),
    "zero1": ("accelerate_configs/ds_zero1.yaml", "sft", []),
    "zero2": ("accelerate_configs/ds_zero2.yaml", "sft", []),
    "zero3": ("accelerate_configs/ds_zero3.yaml", "sft", []),
    "zero2_offload": ("accelerate_configs/ds_zero2_offload.yaml", "sft", ["--save_steps", "0"]),
    "zero3_offload": ("accelerate_configs/ds_zero3_offload.yaml", "sft", ["--save_steps", "0"]),
    "fsdp2": ("accelerate_configs/fsdp2.yaml", "sft", []),
    "pipeline": (PIPELINE, "sft_pipeline", ["--report_to", "tensorboard"]),
    # Qwen2 ties its input and output embeddings: one tensor on the first and the last pipeline stage.
    "1proc_qwen2": (None, "sft", []),
    "pipeline_zero1_qwen2": (PIPELINE, "sft_pipeline", ["--deepspeed_config", "ds_configs/zero1.json"]),
}


@contextlib.contextmanager
def _no_processes_unless_slow(item):
    """A test that is not marked slow fails if it, or a fixture it sets up, starts a process."""
    if item.get_closest_marker("slow"):
        yield
        return

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{item.nodeid} starts a process: mark it @pytest.mark.slow")

    original = subprocess.Popen.__init__
    subprocess.Popen.__init__ = refuse
    try:
        yield
    finally:
        subprocess.Popen.__init__ = original


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _no_processes_unless_slow(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _no_processes_unless_slow(item):
        yield


def pytest_sessionfinish(session, exitstatus):
    WARM_LAUNCHES.end_all()


def pytest_terminal_summary(terminalreporter):
    if WARM_LAUNCHES.counts:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(WARM_LAUNCHES.counts.items()))
        terminalreporter.write_line(f"warm launches (tests/launch_pool.py): {counts}")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer random Llama with the test chat tokenizer, shared by the whole session (read-only)."""
    return make_tiny_decoder(tmp_path_factory.mktemp("tiny_llama"), "llama")


class References:
    """`reference(name)`: the output_dir of the shared job's run on topology `name` (REFERENCES), made on
    first use; `reference.args(name)`: the recipe arguments it ran with, less the memory census."""

    def __init__(self, model: Path, tmp_path_factory):
        self.models = {"llama": model}
        self.tmp_path_factory = tmp_path_factory
        self.made: dict[str, Path] = {}

    def model(self, name: str) -> Path:
        """The tiny model reference `name` trains: Llama, or for *_qwen2 a Qwen2 (tied embeddings)."""
        family = "qwen2" if name.endswith("_qwen2") else "llama"
        if family not in self.models:
            self.models[family] = make_tiny_decoder(self.tmp_path_factory.mktemp(family), family)
        return self.models[family]

    def args(self, name: str, resume: bool = False) -> list[str]:
        """With `resume`, for a run resuming from its checkpoints: exactly what it ran with, its memory census
        included (the recipe refuses to resume with another config)."""
        census = CENSUS if resume and name in CENSUS_REFERENCES else []
        return [*self._args(name, self(name)), *census]

    def __call__(self, name: str) -> Path:
        if name not in self.made:
            accelerate_config, recipe, _ = REFERENCES[name]
            out = self.tmp_path_factory.mktemp(f"reference_{name}")
            args = [*self._args(name, out), *(CENSUS if name in CENSUS_REFERENCES else [])]
            if accelerate_config is None:
                in_process(recipe, args)
            else:
                launch(accelerate_config, recipe, args)
            self.made[name] = out
        return self.made[name]

    def _args(self, name: str, out: Path) -> list[str]:
        _, recipe, extra = REFERENCES[name]
        config = PIPELINE_CONFIG if recipe == "sft_pipeline" else SFT_CONFIG
        return job_args(self.model(name), out, *extra, config=config)


@pytest.fixture(scope="session")
def reference(tiny_llama, tmp_path_factory) -> References:
    return References(tiny_llama, tmp_path_factory)


@pytest.fixture
def deepspeed_env(monkeypatch):
    """`deepspeed_env(ds_json)`: this process becomes rank 0 of a one-process DeepSpeed run, with the
    environment `accelerate launch` gives it for a DeepSpeed config file; undone after the test."""

    def set_env(ds_config: Path) -> None:
        from recipes.core.launch.command import free_port

        values = {
            "ACCELERATE_USE_DEEPSPEED": "true",
            "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_config),
            "ACCELERATE_CONFIG_DS_FIELDS": "deepspeed_config_file",
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }
        for key, value in values.items():
            monkeypatch.setenv(key, value)

    yield set_env
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def encoder(tmp_path_factory) -> Path:
    """A tiny BERT with large random weights, so that predictions differ from sample to sample."""
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny_bert"), initializer_range=0.5)


@pytest.fixture(scope="session")
def news_data(tmp_path_factory) -> Path:
    """The bundled news dataset cut to 50 / 37 / 29 samples."""
    return write_uneven_splits(tmp_path_factory.mktemp("news"))


@pytest.fixture(scope="session")
def classify_reference(encoder, news_data, tmp_path_factory):
    """`classify_reference(name)`: (output_dir, arguments) of the classification job on one process
    ("1proc", in this process) or DDP ("ddp"), made on first use: 50 samples, micro batch 4, GA 2, 2
    epochs, evaluated every 3 steps, checkpoints every 4, keeping the model of the lowest eval loss."""
    made: dict[str, tuple[Path, list[str]]] = {}

    def get(name: str) -> tuple[Path, list[str]]:
        if name not in made:
            out = tmp_path_factory.mktemp(f"classify_{name}")
            args = classify_args(encoder, news_data, out, metric_for_best_model="loss", save_steps=4)
            if name == "ddp":
                launch(TWO_PROCESSES, "classify", args)
            else:
                in_process("classify", args)
            made[name] = (out, args)
        return made[name]

    return get
