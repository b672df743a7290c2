"""StageFill (worker/layer_stream.py): the double-buffer gate, stealing, errors, the stage size."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from elasticserve.worker.layer_stream import LayerStream, StageFill, StreamError


def test_a_layer_is_copied_only_once_its_buffer_is_free() -> None:
    """Layer j reuses buffer j % 2: nobody copies it before the forward pass reached j - 1."""
    log: list[tuple[str, int]] = []
    lock = threading.Lock()

    def copy(layer: int) -> None:
        with lock:
            log.append(("copy", layer))
        time.sleep(0.002)

    fill = StageFill(copy, num_layers=6, deadline_s=10.0)
    helper = threading.Thread(target=fill.run_helper)
    helper.start()
    for layer in range(6):
        fill.before_layer(layer)
        with lock:
            log.append(("enter", layer))
        time.sleep(0.003)  # "compute"
        with lock:
            log.append(("done", layer))
    assert fill.finish()
    helper.join(5)
    copies = [layer for kind, layer in log if kind == "copy"]
    assert sorted(copies) == list(range(6))  # every layer once, by the helper or stolen
    for j in range(2, 6):
        assert log.index(("copy", j)) > log.index(("done", j - 2))  # buffer j % 2 was free
        assert log.index(("copy", j)) < log.index(("enter", j))


def test_without_a_helper_the_step_steals_every_layer() -> None:
    seen: list[int] = []
    fill = StageFill(seen.append, num_layers=4, deadline_s=10.0)
    for layer in range(4):
        fill.before_layer(layer)
    assert seen == [0, 1, 2, 3] and fill.stolen == 4 and fill.finish()


def test_a_copy_error_fails_the_step() -> None:
    def copy(layer: int) -> None:
        if layer == 1:
            raise OSError("boom")

    fill = StageFill(copy, num_layers=3, deadline_s=10.0)
    fill.before_layer(0)
    with pytest.raises(StreamError, match="boom"):
        fill.before_layer(1)


def test_the_stage_grows_on_demand_and_counts_its_bytes() -> None:
    host = torch.zeros(8, 2, 2, 4, 1, 2)  # 8 host blocks, 2 layers
    stream = LayerStream(host)
    assert stream.stage_bytes == 0
    stream._ensure(3)
    per_row = 2 * 4 * 2 * 4  # one layer of one block: K/V x slots x heads x dim x 4 bytes
    assert stream.stage_bytes == 2 * 3 * per_row  # two buffers
    stream._ensure(2)
    assert stream.stage_bytes == 2 * 3 * per_row
    stream._ensure(4)
    assert stream.stage_bytes == 2 * 6 * per_row  # doubled
