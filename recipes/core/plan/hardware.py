"""Accelerators `recipes plan --gpu` knows: dense peak FLOP/s per precision, device memory and memory
bandwidth.

Peaks are the vendor's dense tensor-core figures (without structured sparsity, which datasheets
often quote at 2x) for matrix maths with FP32 accumulation, the mode training uses. "fp32" is plain
FP32 (PyTorch does not use TF32 for matmuls unless asked). A precision a device lacks is absent.
Memory is the datasheet's GB (1e9 bytes), before the framework's own reservation; bandwidth the
datasheet's peak GB/s (what token-by-token decoding is bound by, core/plan/rollout_cost.py).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

TERA = 1e12


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: float
    peak_flops: dict[str, float]  # precision -> dense FLOP/s
    memory_bandwidth: float | None = None  # bytes/s; None: not a datasheet figure (CPU)

    def supports(self, precision: str) -> bool:
        return precision in self.peak_flops


def _gpu(name: str, memory_gb: float, bandwidth_gb_s: float, **tflops: float) -> Device:
    return Device(name, memory_gb * 1e9, {p: v * TERA for p, v in tflops.items()}, bandwidth_gb_s * 1e9)


DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        # NVIDIA H100 Tensor Core GPU Datasheet (H100 SXM column): BF16/FP16 1,979 TFLOPS with sparsity,
        # 3.35 TB/s.
        _gpu("H100-SXM", 80, 3350, fp32=67, tf32=494.5, bf16=989.5, fp16=989.5),
        # NVIDIA H100 Tensor Core GPU Datasheet (H100 PCIe column): BF16/FP16 1,513 TFLOPS with sparsity,
        # 2 TB/s.
        _gpu("H100-PCIe", 80, 2000, fp32=51, tf32=378, bf16=756.5, fp16=756.5),
        # NVIDIA H200 Tensor Core GPU Datasheet (H200 SXM column): same compute as H100 SXM, 141 GB HBM3e
        # at 4.8 TB/s.
        _gpu("H200", 141, 4800, fp32=67, tf32=494.5, bf16=989.5, fp16=989.5),
        # NVIDIA A100 Tensor Core GPU Datasheet: BF16/FP16 312 TFLOPS dense (624 with sparsity); 1,555 GB/s
        # (40GB), 2,039 GB/s (80GB SXM; the PCIe card has 1,935).
        _gpu("A100-40GB", 40, 1555, fp32=19.5, tf32=156, bf16=312, fp16=312),
        _gpu("A100-80GB", 80, 2039, fp32=19.5, tf32=156, bf16=312, fp16=312),
        # NVIDIA L40S GPU Datasheet: BF16/FP16 362.05 TFLOPS dense (733 with sparsity), 48 GB GDDR6 at
        # 864 GB/s.
        _gpu("L40S", 48, 864, fp32=91.6, tf32=183, bf16=362.05, fp16=362.05),
        # NVIDIA A10 Tensor Core GPU Datasheet lists 125 TFLOPS BF16/FP16; the A10G of AWS EC2 G5
        # instances is clocked lower: 70 TFLOPS dense BF16/FP16, 31.2 FP32 (AWS G5 documentation), 24 GB
        # at 600 GB/s.
        _gpu("A10G", 24, 600, fp32=31.2, bf16=70, fp16=70),
        # NVIDIA Ada Lovelace GPU Architecture whitepaper, GeForce RTX 4090 column: FP16/BF16 tensor with
        # FP32 accumulate 165.2 TFLOPS dense (330.4 with sparsity), TF32 82.6, FP32 82.6; 24 GB GDDR6X at
        # 1,008 GB/s.
        _gpu("RTX-4090", 24, 1008, fp32=82.6, tf32=82.6, bf16=165.2, fp16=165.2),
        # NVIDIA V100 Tensor Core GPU Datasheet (SXM2): 125 TFLOPS FP16 tensor, 15.7 FP32, no BF16; 900 GB/s.
        _gpu("V100-32GB", 32, 900, fp32=15.7, fp16=125),
        # NVIDIA T4 Tensor Core GPU Datasheet: 65 TFLOPS FP16 tensor (mixed precision), 8.1 FP32, no BF16;
        # 320 GB/s.
        _gpu("T4", 16, 320, fp32=8.1, fp16=65),
        # One CPU core, not a datasheet figure: AVX2 with two FMA units = 2 x 8 lanes x 2 FLOP = 32 FP32
        # FLOP/cycle at 3 GHz. Real CPU training reaches a small fraction of it: use --calibrate on CPUs.
        # Memory: the host's, so no device limit is checked; its bandwidth depends on the machine: none.
        Device("CPU", float("inf"), {"fp32": 96e9, "bf16": 96e9}),
    )
}


def get_device(name: str) -> Device:
    """Look up `name` case-insensitively; an unknown name lists the table and the closest entry."""
    by_lower = {key.lower(): device for key, device in DEVICES.items()}
    device = by_lower.get(name.lower().replace(" ", "-").replace("_", "-"))
    if device is None:
        close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.4)
        hint = f"; did you mean {by_lower[close[0]].name!r}?" if close else ""
        raise ValueError(f"unknown accelerator {name!r}{hint} Known: {', '.join(DEVICES)}")
    return device
