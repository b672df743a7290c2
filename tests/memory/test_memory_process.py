"""Behaviour visible from outside the process: faults, memory returned, sharing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from elasticserve.memory import MemoryBackend, send_page_handle
from tests.memory.memory_helpers import resident_bytes

CHILD = str(Path(__file__).with_name("memory_child.py"))
MIB = 1 << 20


def run_child(*args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, CHILD, *args], pass_fds=pass_fds,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_unmapped_reads_zero_and_host_write_faults(backend_name: str) -> None:
    child = run_child("probe", backend_name)
    out, _ = child.communicate(timeout=60)
    assert "READ_OK" in out, out
    if backend_name == "host":  # read-only zero mapping: a stray write is a crash
        assert child.returncode == -signal.SIGSEGV, out
        assert "WRITE_DID_NOT_FAULT" not in out
    else:
        assert child.returncode == 0, out


def test_released_memory_leaves_the_process(make_backend: Callable[..., MemoryBackend],
                                            steady_process: int) -> None:
    b = make_backend(page_size=2 * MIB)
    n = 64 * MIB // b.page_size
    vr = b.reserve(n * b.page_size)
    base = resident_bytes(b)
    pages = [b.create_page() for _ in range(n)]
    for i, p in enumerate(pages):
        b.map(vr, i * b.page_size, p)
    b.as_tensor(vr, torch.uint8).fill_(1)  # first touch allocates
    b.synchronize()
    rise = resident_bytes(b) - base
    assert rise >= 60 * MIB, rise
    for i in range(n):
        b.unmap(vr, i * b.page_size)
    if b.name == "host":  # unmapped but not released: the memfd still holds it
        assert os.fstat(pages[0].fd).st_blocks * 512 >= 60 * MIB
    for p in pages:
        b.release_page(p)
    b.synchronize()
    fell = base + rise - resident_bytes(b)
    assert fell >= 0.9 * rise, (rise, fell)
    if b.name == "host":  # and the page file really gave its blocks back
        assert os.fstat(pages[0].fd).st_blocks * 512 < 4 * MIB


def test_page_shared_with_child_process(make_backend: Callable[..., MemoryBackend],
                                        backend_name: str) -> None:
    b = make_backend()
    ps = b.page_size
    vr = b.reserve(ps)
    page = b.create_page()
    b.map(vr, 0, page)
    view = b.as_tensor(vr, torch.uint8)
    view.fill_(0xA1)
    b.synchronize()
    parent_sock, child_sock = socket.socketpair()
    proc_args: list[str] = []
    proc_handle = None
    if backend_name == "host":  # second route: the child opens /proc/<pid>/fd/<fd>
        proc_handle = b.export_page(page)
        proc_args = [str(proc_handle.pid), str(proc_handle.fd), str(proc_handle.offset)]
    child = run_child("share", backend_name, str(child_sock.fileno()), *proc_args,
                      pass_fds=(child_sock.fileno(),))
    child_sock.close()
    try:
        handle = b.export_page(page)
        send_page_handle(parent_sock, handle)
        handle.close()
        assert parent_sock.recv(16) == b"written"
        assert int(view[ps // 2]) == 0xB2 and int(view[ps - 1]) == 0xB2  # child's bytes
        assert int(view[0]) == 0xA1
        view[1] = 0xC3
        b.synchronize()
        parent_sock.sendall(b"your turn")
        assert parent_sock.recv(16) == b"ok"
    except AssertionError as exc:
        parent_sock.close()  # unblocks a child waiting for us
        raise AssertionError(f"{exc}\nchild said:\n{child.communicate(timeout=60)[0]}") from exc
    finally:
        parent_sock.close()
        if proc_handle is not None:
            proc_handle.close()
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0, out


def test_tensor_over_range_sees_new_mappings_at_once(backend: MemoryBackend) -> None:
    vr = backend.reserve(2 * backend.page_size)
    view = backend.as_tensor(vr, torch.float32)  # created before anything is mapped
    backend.map(vr, 0, backend.create_page())
    view[:10] = 0.5
    assert float(view[:10].sum()) == 5.0
    assert view.data_ptr() == vr.base
