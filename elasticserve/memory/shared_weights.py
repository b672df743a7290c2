"""One copy of a model's weights in a memfd, mapped read-only by every process of that model.

The layout is a flat file: each tensor at an aligned offset, named in a `WeightsManifest` (plain
data, pickled over the worker channel). `write_weights` fills an empty memfd once (the loader
process); `map_weights` maps it PROT_READ/MAP_SHARED and returns tensors viewing the mapping;
`adopt_weights` points a module's parameters at those views so its private copies are freed.
Every mapper's RssShmem then includes the weights, while their Pss_Shmem splits one copy.

Read-only for real: the views are ordinary torch tensors (torch has no read-only tensors), but
the pages are mapped without PROT_WRITE, so an in-place write through one kills the process
with SIGSEGV instead of silently changing the weights of every replica.

Opaque oneDNN tensors (prepacked linear weights, kernels/mkldnn_linear.py) are laid out too:
their data bytes at their offset, their layout descriptor in the manifest (`opaque`), and
`map_weights` rebuilds them over the mapping (memory/opaque_tensors.py). Such a tensor does not
reference its memory, so the mapping is hung on it (and on the parameter `adopt_weights`
makes of it) as the attribute `MAPPING_ATTR`; a `.detach()` of it loses that hold.
"""

from __future__ import annotations

import mmap
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from elasticserve.memory import opaque_tensors

# 256 bytes: enough for any SIMD load and for CUDA's allocation granularity of tensor starts
ALIGN = 256

ManifestEntry = tuple[str, int, str, tuple[int, ...]]  # name, byte offset, dtype name, shape
OpaqueEntry = tuple[str, int, bytes]  # name, data bytes, serialized oneDNN memory descriptor
MAPPING_ATTR = "_shared_weights_mapping"  # on opaque views: what keeps their mapping alive


@dataclass(frozen=True, slots=True)
class WeightsManifest:
    """Where each tensor lies in the weights file. Names sharing an offset are tied."""

    entries: tuple[ManifestEntry, ...]
    nbytes: int  # the file's size (a whole number of pages)
    opaque: tuple[OpaqueEntry, ...] = ()  # the entries that are opaque oneDNN tensors

    def names(self) -> list[str]:
        return [e[0] for e in self.entries]

    def opaque_by_name(self) -> dict[str, tuple[int, bytes]]:
        return {name: (size, md) for name, size, md in self.opaque}


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"manifest: unknown dtype {name!r}")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def _layout(tensors: Mapping[str, torch.Tensor]) -> WeightsManifest:
    """Offsets for every tensor; a tensor appearing under several names (tied) is laid out once."""
    entries: list[ManifestEntry] = []
    opaque: list[OpaqueEntry] = []
    placed: dict[tuple[int, torch.dtype, tuple[int, ...], tuple[int, ...]], int] = {}
    end = 0
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensors[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
        shape, is_opaque = tuple(t.shape), opaque_tensors.is_opaque(t)
        ident: tuple[int, torch.dtype, tuple[int, ...], tuple[int, ...]]
        size = opaque_tensors.nbytes(t) if is_opaque else _nbytes(shape, t.dtype)
        if is_opaque:  # never tied (a tied weight stays plain); strides: -1 marks the layout
            opaque.append((name, size, opaque_tensors.metadata(t)))
            ident = (opaque_tensors.data_ptr(t), t.dtype, shape, (-1,))
        else:
            ident = (t.data_ptr(), t.dtype, shape, tuple(t.stride()))
        offset = placed.get(ident) if t.numel() else None
        if offset is None:
            offset = -(-end // ALIGN) * ALIGN
            end = offset + size
            placed[ident] = offset
        entries.append((name, offset, _dtype_name(t.dtype), shape))
    page = mmap.PAGESIZE
    return WeightsManifest(tuple(entries), max(page, -(-end // page) * page), tuple(opaque))


def write_weights(fd: int, tensors: Mapping[str, torch.Tensor]) -> WeightsManifest:
    """Lay `tensors` out in the empty memfd `fd` (sized here) and return the manifest.

    The bytes are copied through a temporary writable mapping, gone when this returns."""
    if os.fstat(fd).st_size != 0:
        raise ValueError(f"fd: the weights file must be empty, it holds {os.fstat(fd).st_size} bytes")
    manifest = _layout(tensors)
    os.ftruncate(fd, manifest.nbytes)
    mm = mmap.mmap(fd, manifest.nbytes, flags=mmap.MAP_SHARED,
                   prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        _copy_into(mm, manifest, tensors)
    finally:
        mm.close()  # the views died with _copy_into's frame: nothing exports the buffer now
    return manifest


def _copy_into(mm: mmap.mmap, manifest: WeightsManifest,
               tensors: Mapping[str, torch.Tensor]) -> None:
    flat = torch.frombuffer(mm, dtype=torch.uint8)
    opaque = manifest.opaque_by_name()
    done: set[int] = set()
    with torch.no_grad():
        for name, offset, dtype, shape in manifest.entries:
            if offset in done:
                continue
            done.add(offset)
            if name in opaque:
                opaque_tensors.copy_to(tensors[name], flat.data_ptr() + offset)
            else:
                _view(flat, offset, _dtype(dtype), shape).copy_(tensors[name].detach().cpu())


def _view(flat: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return flat[offset: offset + _nbytes(shape, dtype)].view(dtype).view(shape)


def map_weights(fd: int, manifest: WeightsManifest) -> dict[str, torch.Tensor]:
    """Tensors viewing a read-only, shared mapping of `fd` (no copy); tied names get one tensor.

    The mapping lives as long as any of the tensors (or views of them) does: the tensors hold
    the mmap object through their storage's buffer, so the caller may close `fd` at once and
    the pages are unmapped when the last tensor dies. Writing through a view faults (SIGSEGV).
    """
    size = os.fstat(fd).st_size
    if size < manifest.nbytes:
        raise ValueError(f"manifest: nbytes={manifest.nbytes} but the weights file holds {size}")
    mm = mmap.mmap(fd, manifest.nbytes, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():
        # "buffer is not writable": deliberately so, the mapping has no PROT_WRITE
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(mm, dtype=torch.uint8)
    out: dict[str, torch.Tensor] = {}
    by_slot: dict[tuple[int, str, tuple[int, ...]], torch.Tensor] = {}
    opaque = manifest.opaque_by_name()
    for name, offset, dtype, shape in manifest.entries:
        shape = tuple(shape)
        size = opaque[name][0] if name in opaque else _nbytes(shape, _dtype(dtype))
        if offset < 0 or offset + size > manifest.nbytes:
            raise ValueError(f"manifest: tensor {name!r} lies outside the file")
        key = (offset, dtype, shape)
        if key in by_slot:
            pass
        elif name in opaque:
            view = opaque_tensors.from_blob(flat.data_ptr() + offset, shape, _dtype(dtype),
                                            opaque[name][1])
            setattr(view, MAPPING_ATTR, flat)  # the view alone would not keep the pages mapped
            by_slot[key] = view
        else:
            by_slot[key] = _view(flat, offset, _dtype(dtype), shape)
        out[name] = by_slot[key]
    return out


def adopt_weights(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Point every parameter and persistent buffer of `module` at `tensors[name]`.

    The module's own copies are dropped (freed unless referenced elsewhere). Parameters that
    were one object under several names (tied embeddings) stay one object. Raises ValueError
    naming the tensor when one is missing or its shape or dtype differs."""
    replaced: dict[int, nn.Parameter] = {}
    originals: list[torch.Tensor] = []  # alive until the end, so id() keys cannot be reused
    for prefix, mod in module.named_modules(remove_duplicate=False):
        pre = f"{prefix}." if prefix else ""
        for leaf, param in list(mod._parameters.items()):
            if param is None:
                continue
            originals.append(param)
            new = replaced.get(id(param))
            if new is None:
                view = _matching(tensors, pre + leaf, param)
                new = nn.Parameter(view, requires_grad=False)
                if hasattr(view, MAPPING_ATTR):  # a new Python object: carry the hold over
                    setattr(new, MAPPING_ATTR, getattr(view, MAPPING_ATTR))
                replaced[id(param)] = new
            mod._parameters[leaf] = new
        for leaf, buf in list(mod._buffers.items()):
            if buf is None or leaf in mod._non_persistent_buffers_set:
                continue
            mod._buffers[leaf] = _matching(tensors, pre + leaf, buf)
    del originals


def _matching(tensors: Mapping[str, torch.Tensor], name: str, old: torch.Tensor) -> torch.Tensor:
    view = tensors.get(name)
    if view is None:
        raise ValueError(f"tensors: no shared tensor for {name!r}")
    if view.shape != old.shape or view.dtype != old.dtype:
        raise ValueError(f"tensors[{name!r}]: {view.dtype}{list(view.shape)} does not match the "
                         f"module's {old.dtype}{list(old.shape)}")
    return view
