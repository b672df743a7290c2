"""Weights in a memfd: written once, mapped read-only and shared, adopted by a module, and the
mapping gone with the last tensor; plus the /proc reader the sharing is measured with."""

from __future__ import annotations

import gc
import os
import pickle

import pytest
import torch
from torch import nn

from elasticserve.memory.procfs import shmem_usage
from elasticserve.memory.shared_weights import (
    ALIGN,
    WeightsManifest,
    adopt_weights,
    map_weights,
    write_weights,
)

MiB = 1 << 20


def _maps_lines(name: str) -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if f"memfd:{name}" in line]


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(33, 8, generator=gen)
    return {
        "embed": embed,
        "norm": torch.randn(7, generator=gen).to(torch.bfloat16),
        "ids": torch.arange(5, dtype=torch.int64),
        "half": torch.randn(3, 5, generator=gen).half(),
        "head": embed,  # tied: the same tensor under a second name
        "strided": torch.randn(6, 4, generator=gen).t(),  # not contiguous: stored contiguous
    }


def test_round_trip_is_bit_exact_read_only_and_ties_one_copy() -> None:
    src = _tensors()
    fd = os.memfd_create("wt-roundtrip")
    manifest = write_weights(fd, src)
    assert pickle.loads(pickle.dumps(manifest)) == manifest
    offsets = {name: off for name, off, _, _ in manifest.entries}
    assert offsets["head"] == offsets["embed"]  # tied weights laid out once
    assert all(off % ALIGN == 0 for off in offsets.values())
    assert manifest.nbytes % os.sysconf("SC_PAGE_SIZE") == 0
    got = map_weights(fd, manifest)
    os.close(fd)  # the mapping does not need the fd
    for name, t in src.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name].view(torch.uint8), t.contiguous().view(torch.uint8))
    assert got["head"] is got["embed"]
    lines = _maps_lines("wt-roundtrip")
    assert lines and all(line.split()[1] == "r--s" for line in lines)  # no PROT_WRITE, shared


def test_mapping_goes_with_the_last_tensor() -> None:
    fd = os.memfd_create("wt-lifetime")
    manifest = write_weights(fd, {"a": torch.ones(1000), "b": torch.zeros(10, 10)})
    assert not _maps_lines("wt-lifetime")  # the writer's temporary mapping is gone
    got = map_weights(fd, manifest)
    os.close(fd)
    keep = got["b"][3]  # a view of a view still holds the mapping
    del got
    gc.collect()
    assert _maps_lines("wt-lifetime") and float(keep.sum()) == 0.0
    del keep
    gc.collect()
    assert not _maps_lines("wt-lifetime")


def test_bad_files_and_manifests_raise_value_error() -> None:
    fd = os.memfd_create("wt-bad")
    try:
        manifest = write_weights(fd, {"a": torch.ones(4)})
        with pytest.raises(ValueError, match="fd: the weights file must be empty"):
            write_weights(fd, {"a": torch.ones(4)})
        with pytest.raises(ValueError, match="nbytes"):
            map_weights(fd, WeightsManifest(manifest.entries, manifest.nbytes * 2))
        outside = WeightsManifest((("a", manifest.nbytes, "float32", (4,)),), manifest.nbytes)
        with pytest.raises(ValueError, match="'a' lies outside"):
            map_weights(fd, outside)
        with pytest.raises(ValueError, match="unknown dtype"):
            map_weights(fd, WeightsManifest((("a", 0, "nonsense", (4,)),), manifest.nbytes))
        empty = os.memfd_create("wt-bad2")
        with pytest.raises(ValueError, match=r"tensors\['x'\] must be a torch.Tensor"):
            write_weights(empty, {"x": [1.0]})  # type: ignore[dict-item]
        os.close(empty)
    finally:
        os.close(fd)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(33, 8)
        self.head = nn.Linear(8, 33, bias=False)
        self.head.weight = self.embed.weight  # tie_word_embeddings
        self.norm = nn.LayerNorm(8)
        self.register_buffer("scale", torch.full((8,), 2.0))
        self.register_buffer("scratch", torch.zeros(8), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(ids)) * self.scale)


def test_adopt_keeps_ties_outputs_and_points_into_the_mapping() -> None:
    torch.manual_seed(0)
    module = _Tied().eval()
    ids = torch.tensor([1, 5, 32])
    with torch.no_grad():
        want = module(ids)
    fd = os.memfd_create("wt-adopt")
    manifest = write_weights(fd, module.state_dict())
    assert "scratch" not in manifest.names()  # non-persistent buffers stay private
    shared = map_weights(fd, manifest)
    os.close(fd)
    base = shared["embed.weight"].untyped_storage().data_ptr()
    adopt_weights(module, shared)
    del shared
    assert module.head.weight is module.embed.weight  # still tied
    adopted = [*module.parameters(), module.scale]
    assert all(base <= t.data_ptr() < base + manifest.nbytes for t in adopted)
    assert not any(t.requires_grad for t in adopted)
    del adopted
    assert module.scratch.data_ptr() != 0  # untouched
    with torch.no_grad():
        assert torch.equal(module(ids), want)
    del module
    gc.collect()
    assert not _maps_lines("wt-adopt")  # the module held the last views


def test_adopt_names_a_missing_or_misshapen_tensor() -> None:
    module = _Tied()
    tensors = dict(module.state_dict())
    with pytest.raises(ValueError, match="no shared tensor for 'norm.bias'"):
        adopt_weights(module, {k: v for k, v in tensors.items() if k != "norm.bias"})
    tensors["norm.weight"] = torch.ones(9)
    with pytest.raises(ValueError, match=r"tensors\['norm.weight'\]"):
        adopt_weights(_Tied(), tensors)


def test_shmem_usage_sees_a_touched_memfd() -> None:
    before = shmem_usage(os.getpid())
    fd = os.memfd_create("wt-shmem")
    write_weights(fd, {"x": torch.ones(8 * MiB // 4)})  # the pages now exist in the file
    got = map_weights(fd, WeightsManifest((("x", 0, "float32", (8 * MiB // 4,)),), 8 * MiB))
    os.close(fd)
    assert float(got["x"].sum()) == 8 * MiB // 4  # reading faults every page in
    during = shmem_usage(os.getpid())
    assert during.rss_shmem - before.rss_shmem >= 7 * MiB
    assert during.pss_shmem - before.pss_shmem >= 7 * MiB  # mapped by this process alone
    del got
    gc.collect()
    assert shmem_usage(os.getpid()).rss_shmem - before.rss_shmem < 2 * MiB
    with pytest.raises(ValueError, match="pid must be positive"):
        shmem_usage(0)
