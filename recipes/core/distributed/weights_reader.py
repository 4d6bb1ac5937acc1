"""A pretrained model's weights read one tensor at a time, so that a process can build only the modules it
runs (a pipeline stage) and never hold the whole model, also not while loading.

safetensors files, single or sharded through `model.safetensors.index.json`, are memory-mapped and each
tensor is read on request; a `pytorch_model.bin` checkpoint is memory-mapped by torch (weights only).
`elements_read` counts what this process took, which the pipeline recipe records per process.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from recipes.core.config import ConfigError

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


def _resolve(name_or_path: str, filename: str) -> Path | None:
    """The file in a local model directory, or in the Hub cache (downloaded on first use); None if absent."""
    local = Path(name_or_path)
    if local.is_dir():
        return local / filename if (local / filename).is_file() else None
    from transformers.utils import cached_file

    found = cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False)
    return Path(found) if found else None


class WeightsReader:
    def __init__(self, name_or_path: str):
        self.name_or_path = name_or_path
        self.elements_read = 0
        self._files: dict[str, Path] = {}  # tensor name -> file
        self._open: dict[Path, object] = {}
        for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (BIN, BIN_INDEX)):
            if (path := _resolve(name_or_path, index)) is not None:
                weight_map = json.loads(path.read_text())["weight_map"]
                files = {f: _resolve(name_or_path, f) for f in sorted(set(weight_map.values()))}
                self._files = {name: files[f] for name, f in weight_map.items()}
                break
            if (path := _resolve(name_or_path, single)) is not None:
                self._files = dict.fromkeys(self._handle(path).keys(), path)
                break
        else:
            raise ConfigError(
                f"{name_or_path!r} holds no {SAFETENSORS} or {BIN} (nor their sharded index); point "
                "model_name_or_path at a directory written by save_pretrained"
            )

    def _handle(self, path: Path):
        if path not in self._open:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                self._open[path] = safe_open(str(path), framework="pt")
            else:  # memory-mapped: tensors are paged in when read, not all at load time
                self._open[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._open[path]

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise ConfigError(
                f"{self.name_or_path!r} has no weight {name!r}, which the pipeline stage needs; the "
                "checkpoint does not use the model's own parameter names: load it with from_pretrained "
                "and save it again with save_pretrained"
            )
        handle = self._handle(self._files[name])
        tensor = handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]
        self.elements_read += tensor.numel()
        return tensor

    def materialize(self, module: nn.Module, prefix: str) -> nn.Module:
        """Give a module built on the meta device its weights from the checkpoint (`prefix`.name), in
        fp32 (the master weights), in place. A module that is already real is left as it is."""
        state = module.state_dict()
        if not any(t.is_meta for t in state.values()):
            return module
        unsaved = {n for n, _ in module.named_buffers()} - set(state)
        if unsaved:  # computed at init, not stored: to_empty would leave them uninitialised
            raise RuntimeError(f"cannot load {prefix} from the checkpoint alone: buffers {sorted(unsaved)}")
        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, target in module.state_dict().items():
                source = self.tensor(f"{prefix}.{name}")
                if source.shape != target.shape:
                    raise ConfigError(
                        f"weight {prefix}.{name} of {self.name_or_path!r} has shape {tuple(source.shape)}, "
                        f"the model's config gives {tuple(target.shape)}; the config and weights disagree"
                    )
                target.copy_(source)
        return module
