"""The measurements of ``bench/gpu_check.py``, one function per section, each returning plain
data (JSON-ready). Every one runs on a CUDA device or, with device "cpu", on the CPU: the host
memory backend instead of CUDA VMM, Triton's interpreter instead of compiled kernels, tiny sizes.
"""

from __future__ import annotations

import functools
import platform
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

# kvcached on an A100, per 2 MiB page (microseconds): FACTS.md / the kvcached paper.
KVCACHED_A100_US = {"create": 193.0, "map": 1.45, "set_access": 36.0, "unmap": 25.6}


def device_info(device: str) -> dict[str, Any]:
    """What ran the check: device name, driver, library versions."""
    import triton

    info: dict[str, Any] = {"device": device, "torch": torch.__version__,
                            "triton": triton.__version__, "python": platform.python_version()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    cuda_runtime=torch.version.cuda, driver=_driver_version())
    else:
        from elasticserve.docs_section import cpu_model

        info.update(name=cpu_model(), cpus=torch.get_num_threads())
    return info


def _driver_version() -> str:
    try:
        from cuda.bindings import driver

        err, version = driver.cuDriverGetVersion()
        return f"{version // 1000}.{version % 1000 // 10}" if int(err) == 0 else f"error {err}"
    except Exception as exc:  # cuda-bindings missing or broken: say so, do not fail the check
        return f"unknown ({type(exc).__name__})"


def _us(out: list[float], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, its microseconds appended to ``out``."""
    t0 = time.perf_counter_ns()
    result = fn(*args)
    out.append((time.perf_counter_ns() - t0) / 1e3)
    return result


def vmm_costs(device: str, pages: int) -> dict[str, Any]:
    """Median microseconds per 2 MiB page of create, map, set-access and unmap, next to
    kvcached's A100 figures. On the CPU: the host backend (memfd slot, mmap, no set-access)."""
    samples: dict[str, list[float]] = {k: [] for k in KVCACHED_A100_US}
    if device == "cuda":
        _cuda_vmm(pages, samples)
        backend = "cuda VMM (raw driver calls)"
    else:
        _host_vmm(pages, samples)
        backend = "host memfd + mmap (set-access: none)"
    median = {k: (round(statistics.median(v), 2) if v else None) for k, v in samples.items()}
    return {"backend": backend, "pages": pages, "median_us": median,
            "kvcached_a100_us": KVCACHED_A100_US}


def _cuda_vmm(pages: int, out: dict[str, list[float]]) -> None:
    from elasticserve.memory import cuda as cuda_mod

    drv, call = cuda_mod._drv, cuda_mod._call
    # the backend's own context, allocation properties and access descriptor (internals: this
    # check times the bare driver calls the backend makes)
    with cuda_mod.CudaBackend(page_size=2 << 20, page_pool=0) as b:
        size = b.page_size
        va = int(call("reserve", drv.cuMemAddressReserve(size * pages, size, 0, 0)))
        handles: list[int] = []
        for i in range(pages):
            handles.append(int(call("create", _us(out["create"], drv.cuMemCreate, size, b._prop, 0))))
            call("map", _us(out["map"], drv.cuMemMap, va + i * size, size, 0, handles[-1], 0))
            call("access", _us(out["set_access"], drv.cuMemSetAccess, va + i * size, size, b._rw, 1))
        b.synchronize()
        for i in range(pages):
            call("unmap", _us(out["unmap"], drv.cuMemUnmap, va + i * size, size))
        for handle in handles:
            call("release", drv.cuMemRelease(handle))
        call("free", drv.cuMemAddressFree(va, size * pages))


def _host_vmm(pages: int, out: dict[str, list[float]]) -> None:
    from elasticserve.memory.backend import PagePlacement
    from elasticserve.memory.host import HostBackend

    with HostBackend(2 << 20) as b:
        vr = b.reserve(pages * b.page_size)
        made = [_us(out["create"], b.create_page, PagePlacement(vr, i * b.page_size))
                for i in range(pages)]
        for i, page in enumerate(made):
            _us(out["map"], b.map, vr, i * b.page_size, page)
        for i in range(pages):
            _us(out["unmap"], b.unmap, vr, i * b.page_size)
        for page in made:
            b.release_page(page)


def triton_vs_torch(device: str, seqs: int, context: int, dtypes: list[str]) -> dict[str, Any]:
    """The Triton kernel against the torch backend on one mixed batch (decode + a prefill chunk
    over a prefix) of a NaN-filled cache: max abs difference and time per call."""
    from elasticserve.kernels.attention import AttentionMetadata, paged_attention

    result: dict[str, Any] = {"seqs": seqs, "context_max": context}
    for name in dtypes:
        specs, args = _attention_batch(device, getattr(torch, name), seqs, context)
        outs, times = [], []
        for triton in (False, True):
            meta = AttentionMetadata.build(specs, _BS, device=device, triton=triton)
            call = functools.partial(paged_attention, *args, 0, meta, _D**-0.5)
            outs.append(call())
            times.append(_timed_ms(device, call))
        diff = float((outs[1].float() - outs[0].float()).abs().max())
        result[name] = {"max_abs_diff": diff, "ok": diff <= (1e-4 if name == "float32" else 3e-2)
                        and bool(torch.isfinite(outs[1]).all()),
                        "torch_ms": round(times[0], 3), "triton_ms": round(times[1], 3)}
    return result


_BS, _HQ, _HKV, _D = 16, 8, 2, 64
_Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _attention_batch(device: str, dtype: torch.dtype, seqs: int, context: int
                     ) -> tuple[list[tuple[int, int, list[int]]], _Tensors]:
    """Specs (the first sequence an 8-token chunk over a prefix, the rest decodes) and
    (q, k, v, cache) with every cached prefix written and every other slot NaN."""
    rng = random.Random(0)
    lens = [rng.randint(context // 2, context) for _ in range(seqs)]
    specs, first = [], 0
    for i, n in enumerate(lens):
        new, blocks = (1 if i else 8), -(-n // _BS)
        specs.append((n - new, new, list(range(first, first + blocks))))
        first += blocks
    cache = torch.full((first, 1, 2, _BS, _HKV, _D), float("nan"), dtype=dtype, device=device)
    for start, _, table in specs:
        full, rem = divmod(start, _BS)
        cache[table[:full], 0] = torch.randn(full, 2, _BS, _HKV, _D, dtype=dtype, device=device)
        if rem:
            cache[table[full], 0, :, :rem] = torch.randn(2, rem, _HKV, _D, dtype=dtype, device=device)
    total = sum(n for _, n, _ in specs)
    q, k, v = (torch.randn(total, h, _D, dtype=dtype, device=device) for h in (_HQ, _HKV, _HKV))
    return specs, (q, k, v, cache)


def _timed_ms(device: str, fn: Callable[[], object], repeat: int = 3) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3
