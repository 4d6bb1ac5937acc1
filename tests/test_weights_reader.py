"""Reading a checkpoint one tensor at a time (recipes/core/distributed/weights_reader.py), as pipeline stages do."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import make_tiny_decoder
from transformers import AutoModelForCausalLM

from recipes.core.config import ConfigError
from recipes.core.distributed.weights_reader import WeightsReader


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_decoder(tmp_path_factory.mktemp("llama"), "llama", num_layers=2)


@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
def test_every_tensor_reads_as_saved_and_is_counted(model_dir, tmp_path, layout):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = model.state_dict()
    if layout == "single":
        path = model_dir
    elif layout == "sharded":  # several files and an index naming the file of each tensor
        model.save_pretrained(tmp_path, max_shard_size="20KB")
        assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > 0
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
        path = tmp_path
    else:
        torch.save({k: v.clone() for k, v in state.items()}, tmp_path / "pytorch_model.bin")
        path = tmp_path
    reader = WeightsReader(str(path))
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(reader.tensor(name), state[name])
    assert reader.elements_read == state[name].numel()  # what was read, nothing more
    for key, tensor in state.items():
        assert torch.equal(reader.tensor(key), tensor), key


def test_a_meta_module_gets_its_weights_and_a_real_one_is_kept(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    reader = WeightsReader(str(model_dir))
    layer = reader.materialize(shell.model.layers[0], "model.layers.0")
    expected = model.model.layers[0].state_dict()
    assert layer.state_dict().keys() == expected.keys()
    for key, tensor in layer.state_dict().items():
        assert torch.equal(tensor, expected[key]) and tensor.dtype == torch.float32
    assert reader.elements_read == sum(t.numel() for t in expected.values())
    assert reader.materialize(layer, "model.layers.0") is layer
    assert reader.elements_read == sum(t.numel() for t in expected.values())  # nothing read again
    assert all(p.is_meta for p in shell.model.layers[1].parameters())  # the other layer was never built


def test_missing_weights_and_missing_files_are_clear_errors(model_dir, tmp_path):
    reader = WeightsReader(str(model_dir))
    with pytest.raises(ConfigError, match=re.escape("has no weight 'model.layers.7.mlp.up_proj.weight'")):
        reader.tensor("model.layers.7.mlp.up_proj.weight")
    with pytest.raises(ConfigError, match=re.escape("holds no model.safetensors or pytorch_model.bin")):
        WeightsReader(str(tmp_path))
