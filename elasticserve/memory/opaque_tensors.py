"""Opaque oneDNN (`torch._mkldnn`) tensors in shared memory: their bytes out, and back in as a
tensor viewing memory someone else owns.

Prepacked linear weights (kernels/mkldnn_linear.py) are such tensors: the data is plain bytes
(as many as the dense weight, possibly padded to the block size) in a layout only oneDNN's
memory descriptor names. To share one packed copy between processes, the loader copies the
bytes and the serialized descriptor into the weights file, and every mapper builds a tensor over
its read-only mapping. torch has no Python constructor for that; its AOTInductor C shim does
(`aoti_torch_create_tensor_from_blob_v2`, the stable C ABI compiled models use to point
prepacked constants at their data blob), reached here through ctypes, and the handle it returns
becomes a Python tensor through `torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr`.

The tensor made by `from_blob` does not own or reference its memory: the caller keeps the
memory alive as long as the tensor (shared_weights.py hangs the mapping on it and on the
parameter it becomes).
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import torch


def is_opaque(t: torch.Tensor) -> bool:
    """Whether `t` is an opaque oneDNN tensor (no strides, no plain data pointer)."""
    return bool(t.is_mkldnn)


def nbytes(t: torch.Tensor) -> int:
    """Bytes of an opaque tensor's data (>= numel x itemsize when the layout pads)."""
    return int(torch.ops.mkldnn._nbytes(t))


def data_ptr(t: torch.Tensor) -> int:
    """Address of an opaque tensor's data."""
    return int(torch.ops.mkldnn.data_ptr(t))


def metadata(t: torch.Tensor) -> bytes:
    """The serialized oneDNN memory descriptor of an opaque tensor (its layout)."""
    return bytes(torch.ops.mkldnn._get_mkldnn_serialized_md(t).numpy().tobytes())


def copy_to(t: torch.Tensor, address: int) -> None:
    """Copy an opaque tensor's `nbytes` data bytes to `address`."""
    ctypes.memmove(address, data_ptr(t), nbytes(t))


@functools.cache
def _shim() -> Any:
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    for name in ("aoti_torch_dtype_float32", "aoti_torch_device_type_cpu",
                 "aoti_torch_layout__mkldnn"):
        getattr(lib, name).restype = ctypes.c_int32
    fn = lib.aoti_torch_create_tensor_from_blob_v2
    fn.restype = ctypes.c_int32
    i64p = ctypes.POINTER(ctypes.c_int64)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, i64p, i64p, ctypes.c_int64, ctypes.c_int32,
                   ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p),
                   ctypes.c_int32, ctypes.c_char_p, ctypes.c_int64]
    lib.aoti_torch_delete_tensor_object.restype = ctypes.c_int32
    lib.aoti_torch_delete_tensor_object.argtypes = [ctypes.c_void_p]
    capsule = ctypes.pythonapi.PyCapsule_New
    capsule.restype = ctypes.py_object
    capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return lib, fn, capsule


def from_blob(address: int, shape: tuple[int, ...], dtype: torch.dtype, md: bytes) -> torch.Tensor:
    """An opaque fp32 tensor of `shape` whose data is the memory at `address` (not copied, not
    owned), laid out as the descriptor `md` (from `metadata`) says."""
    if dtype != torch.float32:
        raise ValueError(f"dtype: opaque tensors are shared as float32 only, got {dtype}")
    lib, fn, capsule = _shim()
    n = len(shape)
    sizes = (ctypes.c_int64 * n)(*shape)
    strides = (ctypes.c_int64 * n)(*_contiguous_strides(shape))
    handle = ctypes.c_void_p()
    rc = fn(address, n, sizes, strides, 0, lib.aoti_torch_dtype_float32(),
            lib.aoti_torch_device_type_cpu(), 0, ctypes.byref(handle),
            lib.aoti_torch_layout__mkldnn(), md, len(md))
    if rc != 0 or not handle.value:
        raise RuntimeError(f"aoti_torch_create_tensor_from_blob_v2 failed (code {rc})")
    try:
        return torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr(
            capsule(handle.value, None, None))
    finally:
        # the binding takes the tensor but leaves the heap at::Tensor the handle points to
        # (measured: use count 2 without this), which would pin the tensor, and with it the
        # Python object and the mapping hung on it, forever
        lib.aoti_torch_delete_tensor_object(handle)


def _contiguous_strides(shape: tuple[int, ...]) -> list[int]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return strides[::-1]
