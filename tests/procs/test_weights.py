"""Shared weights between workers: the front's registry elects one loader per model, hands the
others the ready memfd, recovers from a loader that dies or overruns, and closes the memfd
when the model's last worker detaches; with real processes, two replicas map one copy."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from elasticserve.engine.args import EngineArgs
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.memory import opaque_tensors
from elasticserve.memory.procfs import shmem_usage
from elasticserve.memory.shared_weights import write_weights
from elasticserve.models.make_model import make_model
from elasticserve.procs.messages import (
    Ack,
    AttachWeights,
    DetachWeights,
    WeightsLoad,
    WeightsLoaded,
    WeightsReady,
    WeightsWait,
)
from elasticserve.procs.transport import Channel, channel_pair
from elasticserve.procs.weights import SharedWeights, WeightsRegistry, serve_registry
from tests.procs.weights_child import ENGINE_ARGS, greedy

CHILD = str(Path(__file__).with_name("weights_child.py"))
CHILD_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
MiB = 1 << 20


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Tied embeddings (and biases): the shared embedding table is also the output head."""
    return make_model("qwen2", "tiny", str(tmp_path_factory.mktemp("tiny") / "qwen2"))


def _memfds_open() -> int:
    """This process's open weights memfds (the registry's own copies)."""
    fds = os.listdir("/proc/self/fd")
    return sum(1 for fd in fds if "memfd:weights:" in _link(f"/proc/self/fd/{fd}"))


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _load(reg: WeightsRegistry, worker: str, key: str = "m") -> tuple[object, list[int]]:
    """Attach as `worker`; if elected, write a small file and report it loaded."""
    reply, fds = reg.handle(worker, AttachWeights(key))
    if isinstance(reply, WeightsLoad):
        manifest = write_weights(fds[0], {"w": torch.arange(10.0)})
        assert reg.handle(worker, WeightsLoaded(key, manifest)) == (Ack(), [])
    for fd in fds:
        os.close(fd)
    return reply, fds


def test_one_loader_others_wait_then_map_and_last_detach_closes() -> None:
    reg = WeightsRegistry()
    base = _memfds_open()
    reply, fds = reg.handle("a", AttachWeights("m"))
    assert isinstance(reply, WeightsLoad) and os.fstat(fds[0]).st_size == 0  # an empty memfd
    assert reg.handle("b", AttachWeights("m")) == (WeightsWait(), [])
    assert reg.report()[0]["state"] == "loading" and reg.weights_bytes("m") == 0
    reg.check_integrity()
    manifest = write_weights(fds[0], {"w": torch.arange(10.0)})
    os.close(fds[0])
    assert reg.handle("b", WeightsLoaded("m", manifest))[0].ok is False  # not b's duty
    assert reg.handle("a", WeightsLoaded("m", manifest)) == (Ack(), [])
    ready, ready_fds = reg.handle("b", AttachWeights("m"))
    assert ready == WeightsReady(manifest) and os.fstat(ready_fds[0]).st_size == manifest.nbytes
    os.close(ready_fds[0])
    assert reg.weights_bytes("m") == manifest.nbytes
    assert reg.report() == [{"key": "m", "state": "ready", "loader": None,
                             "workers": ["a", "b"], "bytes": manifest.nbytes}]
    reg.check_integrity()
    assert _memfds_open() == base + 1
    reg.handle("a", DetachWeights("m"))
    assert _memfds_open() == base + 1  # b still uses it
    reg.worker_gone("b")
    assert reg.report() == [] and _memfds_open() == base  # the last one closed the memfd
    assert reg.handle("a", "junk")[0] == Ack(False, "unexpected message str")


def test_a_loader_that_dies_mid_load_hands_the_duty_on() -> None:
    reg = WeightsRegistry()
    front_a, worker_a = channel_pair()
    front_b, worker_b = channel_pair()
    thread_a = serve_registry(front_a, reg, "a")
    serve_registry(front_b, reg, "b")
    reply, fds = worker_a.request(AttachWeights("m"))
    assert isinstance(reply, WeightsLoad)
    os.write(fds[0], b"half a checkpoint")  # then the loader dies
    worker_a.close()
    thread_a.join(5)
    reply, fds_b = worker_b.request(AttachWeights("m"))
    assert isinstance(reply, WeightsLoad)  # b is the loader now ...
    assert os.fstat(fds_b[0]).st_size == 0  # ... of a fresh, empty file
    assert os.fstat(fds[0]).st_ino != os.fstat(fds_b[0]).st_ino
    reg.check_integrity()
    for fd in fds + fds_b:
        os.close(fd)
    worker_b.close()


def test_a_loader_past_its_deadline_is_replaced_and_its_report_refused() -> None:
    reg = WeightsRegistry(load_timeout_s=0.05)
    assert isinstance(_attach_only(reg, "a"), WeightsLoad)
    assert isinstance(_attach_only(reg, "b"), WeightsWait)
    time.sleep(0.1)
    reply, _ = _load(reg, "b")  # the deadline passed: b is elected and finishes
    assert isinstance(reply, WeightsLoad)
    manifest = reg.report()[0]["bytes"]
    stale = os.memfd_create("stale")
    late = reg.handle("a", WeightsLoaded("m", write_weights(stale, {})))[0]
    os.close(stale)
    assert isinstance(late, Ack) and not late.ok and "not loading" in late.error
    assert reg.report()[0]["workers"] == ["b"] and reg.report()[0]["bytes"] == manifest
    with pytest.raises(ValueError, match="load_timeout_s"):
        WeightsRegistry(load_timeout_s=0)


def _attach_only(reg: WeightsRegistry, worker: str, key: str = "m") -> object:
    reply, fds = reg.handle(worker, AttachWeights(key))
    for fd in fds:
        os.close(fd)
    return reply


def test_a_loader_detaching_before_loading_frees_the_duty() -> None:
    reg = WeightsRegistry()
    assert isinstance(_attach_only(reg, "a"), WeightsLoad)
    reg.handle("a", DetachWeights("m"))  # e.g. its checkpoint was corrupt
    assert reg.report() == [] and isinstance(_attach_only(reg, "b"), WeightsLoad)


def _engine(path: str, channel: Channel, **kw: float) -> tuple[LLMEngine, SharedWeights]:
    source = SharedWeights(channel, **kw)
    return LLMEngine(EngineArgs(model=path, **ENGINE_ARGS), weights=source), source  # type: ignore[arg-type]


def _addr(t: torch.Tensor) -> int:
    """Where a parameter's data lies (prepacked linear weights are opaque oneDNN tensors)."""
    return opaque_tensors.data_ptr(t) if opaque_tensors.is_opaque(t) else t.data_ptr()


def test_engines_in_one_process_share_and_detach_on_sleep(tiny_qwen2: str) -> None:
    path = tiny_qwen2
    disk = LLMEngine(EngineArgs(model=path, **ENGINE_ARGS))  # type: ignore[arg-type]
    want = greedy(disk)
    disk.close()
    reg = WeightsRegistry()
    (front_a, a), (front_b, b) = channel_pair(), channel_pair()
    serve_registry(front_a, reg, "a")
    serve_registry(front_b, reg, "b")
    loader, source_a = _engine(path, a)
    mapper, source_b = _engine(path, b)
    assert source_a.loaded_here and not source_b.loaded_here
    assert greedy(loader) == want and greedy(mapper) == want
    ptr = {n: _addr(p) for n, p in loader.model.named_parameters()}
    assert all(ptr[n] != _addr(p) for n, p in mapper.model.named_parameters())  # 2 mappings
    assert loader.model.linears_packed and mapper.model.linears_packed  # packed, then shared
    assert reg.weights_bytes(path) >= loader.weights_bytes
    loader.sleep()
    assert reg.report()[0]["workers"] == ["b"]
    mapper.sleep()
    assert reg.report() == []  # all workers of the model asleep: the weights are gone
    assert mapper.wake() and greedy(mapper) == want  # the sleeper wakes as the new loader
    assert source_b.loaded_here and reg.report()[0]["workers"] == ["b"]
    reg.check_integrity()
    for engine in (loader, mapper):
        engine.close()
    a.close()
    b.close()


def test_waiters_retry_until_ready_or_their_deadline(tiny_qwen2: str) -> None:
    path = tiny_qwen2
    reg = WeightsRegistry()
    assert isinstance(_attach_only(reg, "x", path), WeightsLoad)  # someone else is loading
    front, end = channel_pair()
    serve_registry(front, reg, "w")
    with pytest.raises(TimeoutError, match="not loaded by another worker"):
        _engine(path, end, wait_s=0.2, retry_s=0.02)
    got: list[LLMEngine] = []
    waiter = threading.Thread(target=lambda: got.append(_engine(path, end, retry_s=0.02)[0]))
    waiter.start()
    time.sleep(0.2)
    assert not got  # still waiting
    reg.worker_gone("x")  # the loader died: the waiter is elected and loads
    waiter.join(30)
    assert got and reg.report()[0]["workers"] == ["w"]
    got[0].close()
    end.close()


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """~100 MB of fp32 weights: the weights dominate a worker's shared memory."""
    return make_model("qwen2", "small", str(tmp_path_factory.mktemp("small") / "qwen2"))


def _spawn(fd: int, model: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, CHILD, "serve", str(fd), model], pass_fds=(fd,),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=CHILD_ENV)


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _line(child: subprocess.Popen[str], timeout: float) -> str:
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    assert ready, f"child {child.pid} printed nothing in {timeout} s"
    return child.stdout.readline()


def test_two_worker_processes_map_one_copy(small_model: str) -> None:
    reg = WeightsRegistry()
    children, threads = [], []
    for name in ("r0", "r1"):
        front, end = channel_pair()
        threads.append(serve_registry(front, reg, name))
        children.append(_spawn(end.fileno(), small_model))
        # not Channel.close(): its shutdown() would end the child's copy of the socket too
        end.sock.close()
    try:
        results = [json.loads(_line(c, 60)) for c in children]
        usage = [shmem_usage(c.pid) for c in children]
        weights = reg.weights_bytes(small_model)
        print(f"weights {weights / MiB:.1f} MiB; RssShmem {[u.rss_shmem / MiB for u in usage]} "
              f"MiB; Pss_Shmem {[u.pss_shmem / MiB for u in usage]} MiB; RssAnon "
              f"{[_status_kib(c.pid, 'RssAnon') / 1024 for c in children]} MiB")
        assert sorted(r["loader"] for r in results) == [False, True]
        assert weights >= results[0]["weights_bytes"] >= 90 * MiB
        disk = LLMEngine(EngineArgs(model=small_model, **ENGINE_ARGS))  # type: ignore[arg-type]
        want = greedy(disk)
        disk.close()
        assert results[0]["tokens"] == want and results[1]["tokens"] == want
        assert all(u.rss_shmem >= 0.9 * weights for u in usage)  # each maps all of it
        assert sum(u.pss_shmem for u in usage) <= 1.2 * weights  # about one copy in all
        for c in children:
            assert c.stdin is not None
            c.stdin.close()  # let them sleep (detach) and exit
        assert [_line(c, 30).strip() for c in children] == ["SLEPT", "SLEPT"]
        assert [c.wait(30) for c in children] == [0, 0]
        for t in threads:
            t.join(5)
        assert reg.report() == []  # all workers of the model slept: the memfd is closed
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()


def test_a_write_through_shared_weights_faults() -> None:
    fd = os.memfd_create("weights:probe")
    write_weights(fd, {"x": torch.ones(1024)})
    child = subprocess.Popen([sys.executable, CHILD, "write", str(fd), "4096"], pass_fds=(fd,),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=CHILD_ENV)
    os.close(fd)
    out, _ = child.communicate(timeout=60)
    assert "READ 1024.0" in out, out
    assert child.returncode == -signal.SIGSEGV and "WRITE_DID_NOT_FAULT" not in out, out
