"""LayerwiseCopier on its own: per-layer copies equal the whole-block copy bit for bit, each
layer's event follows its copy, the step's thread copies what a starved helper has not
claimed, and errors and deadlines come back as OnloadError."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
import torch

from elasticserve.kernels.block_copy import copy_rows
from elasticserve.worker.layer_onload import LayerwiseCopier, OnloadError, copy_layer

PAIRS = [(0, 5), (1, 6), (2, 7), (4, 1), (3, 9)]  # runs of several blocks and lone ones
Spans = Sequence[tuple[int, int, int]]


def caches() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    dst = torch.randn(10, 3, 2, 4, 2, 8, generator=gen)  # [block, layer, K/V, slot, head, dim]
    src = torch.randn(6, 3, 2, 4, 2, 8, generator=gen)
    return dst, src


def test_layer_by_layer_equals_the_blocking_copy() -> None:
    dst, src = caches()
    want = dst.clone()
    copy_rows(want, src, PAIRS)
    job = LayerwiseCopier().start(dst, src, PAIRS)
    job.wait_all()
    assert job.finish()
    assert torch.equal(dst, want)


def test_layer_event_follows_its_copy_only() -> None:
    dst, src = caches()
    gate = threading.Event()
    copier = LayerwiseCopier()
    copier.steal = False  # every layer on the helper

    def gated(d: torch.Tensor, s: torch.Tensor, spans: Spans, layer: int) -> None:
        if layer == 2:
            assert gate.wait(timeout=5.0)
        copy_layer(d, s, spans, layer)

    copier.copy_layer = gated
    job = copier.start(dst, src, PAIRS)
    job.wait(0)
    job.wait(1)  # returns while layer 2 is held back
    assert torch.equal(dst[5, 1], src[0, 1]) and not job.done[2].is_set()
    assert not torch.equal(dst[5, 2], src[0, 2])
    gate.set()
    job.wait(2)
    assert job.finish() and job.waited == [0, 1, 2]
    assert torch.equal(dst[5, 2], src[0, 2])


def test_the_step_thread_copies_what_a_starved_helper_has_not_claimed() -> None:
    dst, src = caches()
    want = dst.clone()
    copy_rows(want, src, PAIRS)
    entered, gate = threading.Event(), threading.Event()
    main = threading.current_thread()
    copier = LayerwiseCopier()

    def starved(d: torch.Tensor, s: torch.Tensor, spans: Spans, layer: int) -> None:
        if threading.current_thread() is not main:  # the helper: stuck in its first layer
            entered.set()
            assert gate.wait(timeout=5.0)
        copy_layer(d, s, spans, layer)

    copier.copy_layer = starved
    job = copier.start(dst, src, PAIRS)
    assert entered.wait(timeout=5.0)  # the helper claimed layer 0 and is held there
    job.wait(2)  # layers 1 and 2 are copied here, without waiting for the helper
    assert job.stolen == 2 and not job.done[0].is_set()
    assert torch.equal(dst[:, 1:], want[:, 1:]) and not torch.equal(dst[:, 0], want[:, 0])
    gate.set()
    job.wait(0)
    assert job.finish() and torch.equal(dst, want)


def test_an_error_and_a_missed_deadline_raise_onload_error() -> None:
    dst, src = caches()
    copier = LayerwiseCopier()

    def broken(d: torch.Tensor, s: torch.Tensor, spans: Spans, layer: int) -> None:
        raise OSError("link down")

    copier.copy_layer = broken
    with pytest.raises(OnloadError, match="OSError: link down"):
        copier.start(dst, src, PAIRS).wait(0)
    release = threading.Event()
    copier.copy_layer = lambda *a: None if a[3] == 0 or release.wait(timeout=5.0) else None
    copier.deadline_s, copier.steal = 0.2, False
    job = copier.start(dst, src, PAIRS)
    job.wait(0)
    with pytest.raises(OnloadError, match="waited 0.2s for layer 1"):
        job.wait(1)
    release.set()
    assert job.finish()  # released: the thread stops at the next layer (cancelled)
    with pytest.raises(ValueError, match="deadline_s"):
        LayerwiseCopier(deadline_s=0)
