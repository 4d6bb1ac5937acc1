"""Where a process's model-state memory goes, counted from the tensors it holds, not from its resident set.

The resident set of a process also holds library code, the allocator's cached free blocks and memory
mapped checkpoint pages, so it cannot tell whether ZeRO-3 partitions anything. A census walks every
tensor the Python heap references, counts each storage once (views into one flat buffer are one
allocation) and files it under the first of these that claims it:

- gathered_parameters: ZeRO-3 parameters gathered right now, FSDP2 parameters unsharded right now;
- persistent_parameters: ZeRO-3 parameters below the persistence threshold, kept whole (next to their
  partition);
- parameters: what each process keeps of the model's parameters (its ZeRO-3 partition or FSDP2 shard, or
  the whole parameter);
- master_weights: the copies an optimizer steps on when they are not the model's parameters (DeepSpeed's
  fp32 partitions, also the ones ZeRO-3 hands its optimizer only while it steps);
- optimizer_states: the optimizers' state (Adam's two moments);
- communication_buckets: DeepSpeed's reduce buffers, DDP's all-reduce buckets (with the gradients that
  are views into them);
- gradients: parameters' and master weights' .grad, DeepSpeed's gradient partitions and accumulation
  buffers;
- buffers: modules' buffers (rotary frequencies, position ids);
- other: everything else (batches, activations a caller still references, metrics); `largest_other` names
  the biggest by the attribute that holds them.

The recipes take a census after loading the model and at four points of one step (the MemoryCensus
probe, core/train/probes.py) when memory_census is on; each also notes the resident set and its peak so
far, for comparison.

Tensors that only C++ holds are not seen, except DDP's all-reduce buckets (communication_buckets), which
are counted from the parameters they hold a gradient of; autograd's saved activations are not model
states and not counted.
"""

from __future__ import annotations

import gc
import warnings
from collections import Counter
from typing import Any

import torch

from recipes.core.train.usage import resident_memory_bytes

CATEGORIES = (
    "gathered_parameters",
    "persistent_parameters",
    "parameters",
    "master_weights",
    "optimizer_states",
    "communication_buckets",
    "gradients",
    "buffers",
    "other",
)
MODEL_STATES = CATEGORIES[:-2]  # what ZeRO's accounting counts; buffers and other are not model states
_OWNER_MODULES = ("deepspeed.", "torch.distributed.", "accelerate.")


class Census:
    """Bytes per category of one process at one moment (take_census), and its largest uncategorised storages."""

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter({c: 0 for c in CATEGORIES})
        self._owner: dict[int, str] = {}  # storage -> category
        self._other: dict[int, int] = {}  # uncategorised storage -> bytes
        self.largest_other: list[tuple[str, int]] = []
        self.resident, self.peak_resident = resident_memory_bytes()  # the whole process, for comparison

    def claim(self, tensor: Any, category: str) -> None:
        storage = _storage(tensor)
        if storage is None:
            return
        key, size = storage
        if size and key not in self._owner:
            self._owner[key] = category
            self.bytes[category] += size

    def add_ddp_buckets(self, ddp: Any) -> None:
        """DDP's all-reduce buckets hold a gradient of every trainable parameter; C++ owns them, so the
        heap walk sees only the gradients that are views into them (gradient_as_bucket_view, after a
        synchronising backward). Those views are claimed as buckets; the rest of the buckets, which
        hold every trainable parameter's bytes, is added from that count."""
        trainable = [p for p in ddp.parameters() if p.requires_grad]
        views = [p.grad for p in trainable if p.grad is not None and p.grad._is_view()]
        before = self.bytes["communication_buckets"]
        for grad in views:
            self.claim(grad, "communication_buckets")
        seen = self.bytes["communication_buckets"] - before
        buckets = sum(p.numel() * p.element_size() for p in trainable)
        self.bytes["communication_buckets"] += max(0, buckets - seen)

    @property
    def model_states(self) -> int:
        return sum(self.bytes[c] for c in MODEL_STATES)


def take_census() -> Census:
    """Count this process's tensors now (see the module docstring)."""
    with warnings.catch_warnings():  # reading deprecated torch objects warns
        warnings.simplefilter("ignore")
        return _take_census()


def _take_census() -> Census:
    gc.collect()
    heap = _Heap(gc.get_objects())
    census = Census()
    params = [t for t in heap.tensors if isinstance(t, torch.nn.Parameter)]  # the flag counts, not the type
    optimizers, owners = heap.optimizers, heap.owners
    named = [(n, t) for n, t in _named_tensors(owners) if t.numel() > 1]  # not scalars (norms, flags)

    for owner in owners:  # FSDP2's unsharded parameters (their storage is freed, size 0, once resharded)
        if type(owner).__name__ == "FSDPParam":
            census.claim(getattr(owner, "_unsharded_param", None), "gathered_parameters")
    for p in params:
        if hasattr(p, "ds_tensor"):  # a ZeRO-3 parameter: its partition, and the whole while gathered
            if p.numel():
                census.claim(
                    p.data,
                    "persistent_parameters" if getattr(p, "ds_persist", False) else "gathered_parameters",
                )
            census.claim(p.ds_tensor, "parameters")
    for p in params:
        census.claim(p, "parameters")
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                census.claim(p, "master_weights")
    for name, tensor in named:  # ZeRO-3 hands its fp32 partitions to the optimizer only while it steps
        if "fp32" in name.lower():
            census.claim(tensor, "master_weights")
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for value in state.values():
                census.claim(value, "optimizer_states")
    for name, tensor in named:
        lowered = name.lower()
        if "bucket" in lowered or "ipg" in lowered:
            census.claim(tensor, "communication_buckets")
    for ddp in heap.ddps:
        census.add_ddp_buckets(ddp)
    for p in params:
        census.claim(p.grad, "gradients")
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                census.claim(p.grad, "gradients")
    for name, tensor in named:
        if "grad" in name.lower():
            census.claim(tensor, "gradients")
    for module in heap.modules:
        for buffer in module._buffers.values():
            census.claim(buffer, "buffers")

    labels = {_storage(t)[0]: name for name, t in named if _storage(t) is not None}
    for tensor in heap.tensors:
        storage = _storage(tensor)
        if storage is not None and storage[1] and storage[0] not in census._owner:
            census._other[storage[0]] = storage[1]
            census.claim(tensor, "other")
    biggest = sorted(census._other.items(), key=lambda item: -item[1])[:5]
    census.largest_other = [(labels.get(key, "unnamed tensor"), size) for key, size in biggest]
    return census


class _Heap:
    """The objects a census reads, sorted in one pass in heap order: a process that has loaded the
    libraries holds about half a million objects, so each object's type is classified once per type
    (isinstance on every object, once per kind, took most of a census's second)."""

    def __init__(self, objects: list[Any]) -> None:
        self.tensors: list[Any] = []
        self.optimizers: list[Any] = []
        self.owners: list[Any] = []  # objects of the distributed libraries, whose attributes name tensors
        self.ddps: list[Any] = []
        self.modules: list[Any] = []
        kinds: dict[type, tuple[list[Any], ...]] = {}
        for obj in objects:
            kind = type(obj)
            lists = kinds.get(kind)
            if lists is None:
                lists = kinds[kind] = self._lists_of(kind)
            for found in lists:
                found.append(obj)

    def _lists_of(self, kind: type) -> tuple[list[Any], ...]:
        module = getattr(kind, "__module__", None)
        checks = (
            (self.tensors, issubclass(kind, torch.Tensor)),
            (self.optimizers, issubclass(kind, torch.optim.Optimizer)),
            (self.owners, isinstance(module, str) and module.startswith(_OWNER_MODULES)),
            (self.ddps, issubclass(kind, torch.nn.parallel.DistributedDataParallel)),
            (self.modules, issubclass(kind, torch.nn.Module)),
        )
        return tuple(found for found, belongs in checks if belongs)


def _storage(tensor: Any) -> tuple[int, int] | None:
    """(identity, bytes) of a tensor's storage; None for no tensor, a meta tensor or an empty one."""
    if not isinstance(tensor, torch.Tensor):
        return None
    local = getattr(tensor, "_local_tensor", None)  # a DTensor: its shard on this process
    if local is not None:
        tensor = local
    if tensor.device.type == "meta":
        return None
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without real data (fake tensors a compiler made)
        return None


def _named_tensors(owners: list[Any]):
    """("Class.attribute", tensor) of the tensors distributed libraries' objects hold as attributes, also
    inside a list, tuple or dict attribute."""
    for owner in owners:
        try:
            attributes = vars(owner)
        except TypeError:
            continue
        for attr, value in list(attributes.items()):
            name = f"{type(owner).__name__}.{attr}"
            if isinstance(value, torch.Tensor):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for item in value:
                    if isinstance(item, torch.Tensor):
                        yield name, item
                    elif isinstance(item, (list, tuple)):  # DeepSpeed's per-group lists of partitions
                        yield from ((name, t) for t in item if isinstance(t, torch.Tensor))
            elif isinstance(value, dict):
                yield from ((name, t) for t in value.values() if isinstance(t, torch.Tensor))


POINTS = ("loaded", "start", "forward", "backward", "after_step")


def census_record(censuses: dict[str, Census], ranks: Any) -> dict[str, Any]:
    """The censuses of every process for the run's record: {point: {category: [bytes per rank]}}, with
    model_states (the sum of MODEL_STATES), the resident set then and its peak so far (resident,
    peak_resident) per rank, and the main process's largest uncategorised storages. Every rank calls it
    with the same points."""
    record: dict[str, Any] = {}
    for point in (p for p in POINTS if p in censuses):
        census = censuses[point]
        values = {c: ranks.gather(census.bytes[c]) for c in CATEGORIES}
        values["model_states"] = ranks.gather(census.model_states)
        values["resident"] = ranks.gather(census.resident)
        values["peak_resident"] = ranks.gather(census.peak_resident)
        values["largest_other_rank0"] = [[name, size] for name, size in census.largest_other]
        record[point] = values
    return record


def tensors_with_grad(output: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, a ModelOutput or dict, a tuple or list, nested) that
    require a gradient; backward reaches the ones the loss is computed from."""
    if isinstance(output, torch.Tensor):
        return [output] if output.requires_grad else []
    values = (
        output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else ()
    )
    return [t for value in values for t in tensors_with_grad(value)]
