"""Native (C) paged decode attention, built with ``csrc/*.c`` into one library on first use.

The torch decode path gathers every sequence's context into a buffer, then SDPA reads it again:
three passes over the KV bytes. The C kernel reads K and V once, straight from their blocks (on
AVX-512 CPUs in one pass with an online softmax; ``python -m elasticserve.bench.decode_attention``
times it against an older revision).
It is compiled with the system C compiler (``$CC`` or ``cc``) into a per-user cache keyed by the
source, flags and CPU, and called through ``ctypes`` (which releases the GIL, so a helper
thread can run half the sequences in parallel). Without a compiler the engine falls back to
the torch path; ``attention_backend="native"`` makes that an error instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_SOURCES = (Path(__file__).with_name("csrc") / "paged_decode.c",
            Path(__file__).with_name("csrc") / "fused_ops.c")
# Compiled and linked in two steps: linking a shared object with -ffast-math would pull in
# crtfastmath.o, which turns on flush-to-zero for the whole process (torch included).
_COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC", "-std=c11"]
# Decode batches with less context than this stay on the calling thread: a hand-off costs
# about 0.1 ms, and the one-pass kernel reads ~10-25 GB/s per thread (bench.decode_attention);
# with the machine's second core busy (load >= 2) a split measured no faster even at B=32 x 300.
_SPLIT_MIN_TOKENS = 4096

_i64, _f32c = ctypes.c_int64, ctypes.c_float
_f32p, _i64p = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int64)
# name -> (argument types, return type) of every exported C function
_FUNCTIONS: dict[str, tuple[list[Any], Any]] = {
    "es_paged_decode_f32": ([_f32p, _i64, _f32p, _i64, _i64, _i64, _i64, _i64, _i64, _i64p, _i64p,
                             _i64p, _i64, _i64, _i64, _i64, _f32c, _f32p, _i64], ctypes.c_int),
    # fused_ops.c, wrapped by kernels/native_ops.py
    "es_rms_norm_f32": ([_f32p, _i64, _f32p, _f32p, _i64, _i64, _i64, _f32c, _i64, _i64], None),
    "es_rope_f32": ([_f32p, _i64, _i64, _i64, _f32p, _f32p, _i64, _i64, _i64], None),
    "es_silu_mul_f32": ([_f32p, _f32p, _i64, _i64, _i64, _i64], None),
}

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_load_error: str | None = None
_helpers: ThreadPoolExecutor | None = None


class NativeUnavailableError(RuntimeError):
    """The C kernel could not be built or loaded on this machine."""


def _cache_dir() -> Path:
    root = os.environ.get("ELASTICSERVE_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(root or Path.home() / ".cache") / "elasticserve" / "native"


def _cpu_key() -> str:
    """-march=native code must not run on another CPU sharing the cache directory."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def _build(compiler: str) -> Path:
    digest = hashlib.sha256(b"\0".join(
        [*(src.read_bytes() for src in _SOURCES), " ".join(_COMPILE_FLAGS).encode(),
         compiler.encode(), _cpu_key().encode(), platform.machine().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"elasticserve-native-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objs = [str(Path(tmp) / f"{src.stem}.o") for src in _SOURCES]
        lib = Path(tmp) / "native.so"
        cmds = [[compiler, *_COMPILE_FLAGS, "-c", str(src), "-o", obj]
                for src, obj in zip(_SOURCES, objs, strict=True)]
        for cmd in [*cmds, [compiler, "-shared", *objs, "-o", str(lib), "-lm"]]:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise NativeUnavailableError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
        os.replace(lib, target)  # atomic: concurrent builders race harmlessly
    return target


def load_library() -> ctypes.CDLL:
    """The compiled kernel, built on first call; raises NativeUnavailableError."""
    global _library, _load_error
    with _lock:
        if _library is not None:
            return _library
        if _load_error is not None:
            raise NativeUnavailableError(_load_error)
        compiler = shutil.which(os.environ.get("CC", "cc"))
        try:
            if compiler is None:
                raise NativeUnavailableError("no C compiler (set CC or install cc)")
            lib = ctypes.CDLL(str(_build(compiler)))
        except (OSError, subprocess.SubprocessError, NativeUnavailableError) as err:
            _load_error = f"native paged attention unavailable: {err}"
            raise NativeUnavailableError(_load_error) from err
        for name, (argtypes, restype) in _FUNCTIONS.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = restype
        _library = lib
        return lib


def available() -> bool:
    """True when the kernel builds and loads here (logs why not, once)."""
    try:
        load_library()
    except NativeUnavailableError as err:
        log.warning("%s; using the torch decode path", err)
        return False
    return True


def supports(kv_cache: torch.Tensor, dtype: torch.dtype) -> bool:
    """The kernel handles fp32, contiguous, CPU caches and fp32 queries."""
    return (kv_cache.device.type == "cpu" and kv_cache.dtype == torch.float32
            and dtype == torch.float32 and kv_cache.is_contiguous())


@dataclass(slots=True)
class NativeDecode:
    """The decode sequences of one step, longest context first (alternate rows per thread
    then carry about equal work)."""

    tokens: torch.Tensor  # [n] int64: flat index of each sequence's query and output row
    seq_lens: torch.Tensor  # [n] int64
    tables: torch.Tensor  # [n, max_blocks] int64, contiguous
    total_tokens: int  # context tokens over all sequences
    # threads the call may split over (0: the current torch count). The runner sets the
    # engine's configured count: a decode step runs its many small ops on one thread
    # (worker/step_threads.py), but one call over a large context gains from a second core
    # (B=32: step median 43.6 -> 33.8 ms, docs/BENCHMARKS.md `peer-profile` commentary).
    threads: int = 0

    @classmethod
    def build(cls, tokens: list[int], seq_lens: list[int], tables: torch.Tensor) -> NativeDecode:
        order = sorted(range(len(tokens)), key=lambda r: -seq_lens[r])
        return cls(torch.tensor([tokens[r] for r in order], dtype=torch.int64),
                   torch.tensor([seq_lens[r] for r in order], dtype=torch.int64),
                   tables[order].contiguous(), sum(seq_lens))


def decode(q: torch.Tensor, kv_cache: torch.Tensor, layer_idx: int, work: NativeDecode,
           scale: float, out: torch.Tensor) -> None:
    """Attend each decode sequence's query ``q[token]`` ([T, Hq, D]) over its cached context
    and write ``out[token]``; other rows of ``out`` are left alone."""
    fn = load_library().es_paged_decode_f32
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        q = q.contiguous()
    assert out.stride(2) == 1 and out.stride(1) == out.shape[2], "out rows must be dense"
    _, num_layers, _, block_size, hkv, d = kv_cache.shape
    n = work.tokens.numel()
    args = (ctypes.cast(q.data_ptr(), _f32p), q.stride(0), ctypes.cast(kv_cache.data_ptr(), _f32p),
            num_layers, layer_idx, block_size, hkv, q.shape[1], d,
            ctypes.cast(work.tokens.data_ptr(), _i64p), ctypes.cast(work.seq_lens.data_ptr(), _i64p),
            ctypes.cast(work.tables.data_ptr(), _i64p), work.tables.stride(0), n)
    tail = (_f32c(scale), ctypes.cast(out.data_ptr(), _f32p), out.stride(0))
    threads = max(torch.get_num_threads(), work.threads)
    parts = min(threads, n) if work.total_tokens >= _SPLIT_MIN_TOKENS else 1

    def part(first: int, step: int) -> None:
        rc = fn(*args, first, step, *tail)
        if rc != 0:
            raise MemoryError(f"native paged attention failed (code {rc})")

    run_split(part, parts)


def run_split(part: Callable[[int, int], None], parts: int) -> None:
    """``part(first, step)`` for first = 0 .. parts - 1: the first on this thread, the others on
    the helper pool (ctypes drops the GIL, so they run in parallel)."""
    jobs = [_pool().submit(part, i, parts) for i in range(1, parts)]
    part(0, parts)
    for job in jobs:
        job.result()


def _pool() -> ThreadPoolExecutor:
    global _helpers
    with _lock:
        if _helpers is None:
            _helpers = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1),
                                          thread_name_prefix="native")
        return _helpers


BACKENDS = ("auto", "torch", "native", "triton")


def use_native(backend: str, kv_cache: torch.Tensor, dtype: torch.dtype) -> bool:
    """Resolve ``attention_backend``: "auto" takes the kernel where it applies and builds,
    "native" requires it, "torch" never uses it."""
    if backend not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend in ("torch", "triton"):
        return False
    fits = supports(kv_cache, dtype)
    if backend == "native":
        if not fits:
            raise ValueError("attention_backend='native' needs an fp32 model and a contiguous fp32 "
                             f"CPU KV cache (got {dtype}, {kv_cache.dtype} on {kv_cache.device})")
        load_library()
        return True
    return fits and available()
