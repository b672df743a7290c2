"""Device specs for the roofline cost model.

Peak numbers are the vendors' datasheet values (SXM parts, dense BF16 tensor-core FLOP/s, no
sparsity). The efficiency factors, step overhead and page-map cost are assumptions, not
measurements: they are named fields so a calibration can replace them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GiB = 1 << 30
GB = 10**9
TB = 10**12


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One GPU. Times: ``max(flops / (peak * eff), bytes / (bw * eff)) + overhead``."""

    name: str
    memory_bytes: int
    hbm_bw: float  # bytes/s
    bf16_flops: float  # FLOP/s, dense
    host_bw: float  # bytes/s per direction over PCIe (weights load, KV swap)
    nvlink_bw: float  # bytes/s per GPU, for tensor-parallel all-reduce
    page_map_s: float = 30e-6  # map or unmap of one 2 MiB page (cuMemMap + SetAccess); assumed
    step_overhead_s: float = 2e-3  # per-step launch/scheduling cost outside the kernels; assumed
    flops_eff: float = 0.6  # achievable fraction of peak FLOP/s on serving GEMMs; assumed
    bw_eff: float = 0.8  # achievable fraction of peak HBM bandwidth; assumed
    host_eff: float = 0.8  # achievable fraction of the PCIe per-direction peak; assumed
    allreduce_latency_s: float = 8e-6  # per all-reduce call; assumed

    def step_seconds(self, flops: float, nbytes: float, num_seqs: int, tp: int = 1,
                     weights_bytes: float = 0.0) -> float:
        """Roofline time of one forward step over ``tp`` GPUs (communication excluded);
        ``weights_bytes`` (the part of ``nbytes`` that is weights) does not matter here."""
        compute = flops / (tp * self.bf16_flops * self.flops_eff)
        memory = nbytes / (tp * self.hbm_bw * self.bw_eff)
        return max(compute, memory) + self.step_overhead_s

    def transfer_seconds(self, nbytes: float, tp: int = 1) -> float:
        """Host <-> device copy; each of the ``tp`` GPUs has its own link."""
        return nbytes / (tp * self.host_bw * self.host_eff)

    def copy_seconds(self, nbytes: float, tp: int = 1) -> float:
        """Device-to-device copy (compaction, copy-on-write): read plus write."""
        return 2 * nbytes / (tp * self.hbm_bw * self.bw_eff)

    def allreduce_seconds(self, nbytes: float, tp: int) -> float:
        """Ring all-reduce of ``nbytes`` across ``tp`` GPUs."""
        if tp <= 1:
            return 0.0
        return self.allreduce_latency_s + 2 * (tp - 1) / tp * nbytes / self.nvlink_bw

    def replace(self, **changes: float | int | str) -> GpuSpec:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class CpuSpec:
    """A CPU running the engine's torch model: compute and memory time add up (no overlap
    to speak of at these sizes), plus fixed and per-sequence Python costs.

    The defaults are placeholders; :func:`elasticserve.sim.calibrate.fit_cpu_spec` fits all
    four rates from measured step times.
    """

    name: str = "cpu"
    memory_bytes: int = 64 * GiB
    flops: float = 5e11  # FLOP/s achieved on the model's matmuls; placeholder
    mem_bw: float = 5e10  # bytes/s achieved streaming weights and KV; placeholder
    step_overhead_s: float = 5e-3  # Python per step; placeholder
    per_seq_s: float = 2e-4  # Python per scheduled sequence; placeholder
    host_bw: float = 1e10  # "swap" is a memcpy between two host buffers
    nvlink_bw: float = 1e10
    page_map_s: float = 5e-6  # mmap/munmap of one page; placeholder
    hbm_bw: float = 5e10
    # bytes/s streaming the weights each step; None: mem_bw. Infinite when a calibration folds
    # the weights into step_overhead_s (for one model the two are the same constant)
    weights_bw: float | None = None

    def step_seconds(self, flops: float, nbytes: float, num_seqs: int, tp: int = 1,
                     weights_bytes: float = 0.0) -> float:
        """``weights_bytes`` of ``nbytes`` move at ``weights_bw``, the rest at ``mem_bw``."""
        wbw = self.mem_bw if self.weights_bw is None else self.weights_bw
        return (self.step_overhead_s + self.per_seq_s * num_seqs + flops / self.flops
                + (nbytes - weights_bytes) / self.mem_bw + weights_bytes / wbw)

    def transfer_seconds(self, nbytes: float, tp: int = 1) -> float:
        return nbytes / self.host_bw

    def copy_seconds(self, nbytes: float, tp: int = 1) -> float:
        return 2 * nbytes / self.mem_bw

    def allreduce_seconds(self, nbytes: float, tp: int) -> float:
        return 0.0


DeviceSpec = GpuSpec | CpuSpec

# Datasheets: A100 80GB SXM (HBM2e 2,039 GB/s, 312 TFLOPS BF16, PCIe Gen4 x16, NVLink 600 GB/s);
# H100 SXM (HBM3 3.35 TB/s, 989 TFLOPS BF16, PCIe Gen5 x16, NVLink 900 GB/s);
# H200 SXM (141 GB HBM3e 4.8 TB/s, 989 TFLOPS BF16, PCIe Gen5 x16, NVLink 900 GB/s).
# PCIe per direction: Gen4 x16 ~32 GB/s, Gen5 x16 ~64 GB/s. NVLink figures are totals for both
# directions; a ring all-reduce moves data one way, so half is used.
A100_80GB = GpuSpec("A100-80GB", memory_bytes=80 * GiB, hbm_bw=2.039 * TB, bf16_flops=312 * TB,
                    host_bw=32 * GB, nvlink_bw=300 * GB)
H100_80GB = GpuSpec("H100-80GB", memory_bytes=80 * GiB, hbm_bw=3.35 * TB, bf16_flops=989 * TB,
                    host_bw=64 * GB, nvlink_bw=450 * GB)
H200 = GpuSpec("H200", memory_bytes=141 * GB, hbm_bw=4.8 * TB, bf16_flops=989 * TB,
               host_bw=64 * GB, nvlink_bw=450 * GB)

GPU_SPECS: dict[str, GpuSpec] = {g.name: g for g in (A100_80GB, H100_80GB, H200)}


def get_gpu(name: str) -> GpuSpec:
    """A built-in GPU spec by name (case-insensitive; "H100" matches "H100-80GB")."""
    for key, spec in GPU_SPECS.items():
        if name.lower() in (key.lower(), key.split("-")[0].lower()):
            return spec
    raise KeyError(f"unknown GPU {name!r}; built-ins: {', '.join(GPU_SPECS)}")
