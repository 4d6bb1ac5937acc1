"""What an accelerate config (and the DeepSpeed config it names) says about the run's topology."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from recipes.core.config import read_mapping
from recipes.core.distributed.deepspeed_contract import pipeline_stages
from recipes.core.distributed.fsdp_contract import normalized, shard_size


@dataclass(frozen=True)
class Topology:
    world_size: int = 1
    num_machines: int = 1
    zero_stage: int = 0  # 0: plain data parallelism (DDP or one process)
    offload_optimizer: str | None = None  # "cpu" | "nvme" | None
    offload_param: str | None = None
    pipeline_stages: int = 1
    deepspeed_precision: str | None = None  # set only when the DS config enables bf16/fp16 explicitly
    deepspeed_config: str | None = None
    fsdp_shard_size: int | None = None  # FSDP2: processes each parameter is sharded over (None: no FSDP)
    fsdp_offload: bool = False  # FSDP2 parameters, gradients and optimizer states in CPU memory
    fsdp_reshard_after_forward: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def read_topology(accelerate_config: str | None = None, deepspeed_config: str | None = None) -> Topology:
    """World size, machines, ZeRO stage or FSDP2 sharding, offload and precision from the config files
    (either may be None)."""
    acc = read_mapping(accelerate_config) if accelerate_config else {}
    acc_ds = acc.get("deepspeed_config") or {}
    deepspeed_config = deepspeed_config or acc_ds.get("deepspeed_config_file")
    ds = read_mapping(deepspeed_config) if deepspeed_config else None
    if ds is None:  # DeepSpeed configured inline in the accelerate config, or not at all
        uses_ds = acc.get("distributed_type") == "DEEPSPEED"
        zero_stage = int(acc_ds.get("zero_stage", 0)) if uses_ds else 0
        offload_optimizer, offload_param, precision = (
            _device(acc_ds.get("offload_optimizer_device")),
            _device(acc_ds.get("offload_param_device")),
            None,
        )
    else:
        zero = ds.get("zero_optimization") or {}
        zero_stage = int(zero.get("stage", 0))
        offload_optimizer = _device((zero.get("offload_optimizer") or {}).get("device"))
        offload_param = _device((zero.get("offload_param") or {}).get("device"))
        enabled = [
            p for p in ("bf16", "fp16") if isinstance(ds.get(p), dict) and ds[p].get("enabled") is True
        ]
        precision = enabled[0] if enabled else None
    world_size = int(acc.get("num_processes", 1))
    fsdp = normalized(acc.get("fsdp_config")) if acc.get("distributed_type") == "FSDP" else None
    return Topology(
        world_size=world_size,
        num_machines=int(acc.get("num_machines", 1)),
        zero_stage=zero_stage,
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
        pipeline_stages=pipeline_stages(ds, None),
        deepspeed_precision=precision,
        deepspeed_config=deepspeed_config,
        fsdp_shard_size=None if fsdp is None else shard_size(acc, world_size),
        fsdp_offload=fsdp is not None and str(fsdp.get("fsdp_offload_params")).lower() == "true",
        fsdp_reshard_after_forward=fsdp is None
        or str(fsdp.get("fsdp_reshard_after_forward", True)).lower() == "true",
    )


def _device(value) -> str | None:
    return value if value in ("cpu", "nvme") else None
