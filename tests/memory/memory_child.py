"""Child-process side of the memory tests (run as a script, never collected).

usage: memory_child.py probe BACKEND          reads unmapped space, then writes it
       memory_child.py share BACKEND SOCK_FD [PID FD OFFSET]
"""

from __future__ import annotations

import socket
import sys

import torch

from elasticserve.memory import PageHandle, get_backend, recv_page_handle


def probe(name: str) -> None:
    """Reading unmapped space must give zeros; on the host a write must then SIGSEGV."""
    b = get_backend(name, page_size=64 * 1024 if name == "host" else None)
    vr = b.reserve(4 * b.page_size)
    b.map(vr, b.page_size, b.create_page())
    view = b.as_tensor(vr, torch.uint8)
    view[b.page_size : 2 * b.page_size] = 1
    outside = torch.cat([view[: b.page_size], view[2 * b.page_size :]])
    assert int(outside.count_nonzero()) == 0, "unmapped space is not zero"
    print("READ_OK", flush=True)
    if name == "host":
        view[0] = 1  # unmapped and read-only: the kernel must kill us here
        print("WRITE_DID_NOT_FAULT", flush=True)


def share(name: str, sock_fd: int, proc: list[str]) -> None:
    """Import the parent's page, check its bytes, write ours, then check the parent's."""
    sock = socket.socket(fileno=sock_fd)
    b = get_backend(name, page_size=64 * 1024 if name == "host" else None)
    handle = recv_page_handle(sock)
    page = b.import_page(handle)
    handle.close()
    vr = b.reserve(2 * b.page_size)
    b.map(vr, 0, page)
    view = b.as_tensor(vr, torch.uint8)
    assert int(view[0]) == 0xA1 and int(view[b.page_size - 1]) == 0xA1, "parent bytes"
    view[b.page_size // 2 : b.page_size] = 0xB2
    b.synchronize()
    if proc:  # the same page again, opened through /proc/<pid>/fd of the parent
        pid, fd, off = (int(x) for x in proc)
        twin = b.import_page(PageHandle("host", fd, off, b.page_size, pid))
        b.map(vr, b.page_size, twin)
        assert int(view[b.page_size + b.page_size // 2]) == 0xB2, "/proc import differs"
    sock.sendall(b"written")
    assert sock.recv(16) == b"your turn"
    assert int(view[1]) == 0xC3, "child does not see the parent's second write"
    sock.sendall(b"ok")
    b.close()


if __name__ == "__main__":
    if sys.argv[1] == "probe":
        probe(sys.argv[2])
    else:
        share(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
