"""Framed messages over a Unix stream socket, with file descriptors riding along (SCM_RIGHTS).

Why not ZeroMQ + msgspec (vLLM's choice): our messages go between processes of one machine,
one per worker per step, and carry fds (memfd pages, CUDA VMM handles exported as POSIX fds),
which a Unix socket passes natively and ZeroMQ cannot. Payloads are pickled (protocol 5): the
types crossing are the engine's own dataclasses. A frame is an 8-byte header (payload length,
fd count) sent together with its fds, then the payload.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import threading
from collections.abc import Sequence

_HEADER = struct.Struct("<II")
MAX_FDS = 253  # SCM_MAX_FD


class ChannelClosed(ConnectionError):
    """The other end closed the socket (or died): no more messages will come."""


class Channel:
    """One end of a socket carrying pickled messages. `send` is thread-safe; `recv` must be
    called by one thread at a time (a reader thread, or a caller holding `rpc_lock`)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self.rpc_lock = threading.Lock()  # request/reply callers: one exchange at a time
        self.closed = False

    def send(self, msg: object, fds: Sequence[int] = ()) -> None:
        """Send `msg` (pickled) and duplicates of `fds` (the caller keeps its own)."""
        if len(fds) > MAX_FDS:
            raise ValueError(f"at most {MAX_FDS} fds per message, got {len(fds)}")
        payload = pickle.dumps(msg, protocol=5)
        # header and payload in one write: the reader wakes once per message, not twice (a
        # worker sends a message every step, and each wake-up can cost the sender its core on
        # a busy machine)
        frame = _HEADER.pack(len(payload), len(fds)) + payload
        try:
            with self._send_lock:
                sent = socket.send_fds(self.sock, [frame], list(fds)) if fds else 0
                if sent < len(frame):
                    self.sock.sendall(memoryview(frame)[sent:])
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise ChannelClosed(f"channel closed while sending: {exc}") from exc

    def recv(self) -> tuple[object, list[int]]:
        """The next message and the fds that came with it (now owned by the caller)."""
        head, fds = self._recv_header()
        try:
            (length, nfds) = _HEADER.unpack(head)
            if nfds != len(fds):
                raise ChannelClosed(f"expected {nfds} fds with the message, got {len(fds)}")
            return pickle.loads(self._recv_exact(length)), fds
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def request(self, msg: object, fds: Sequence[int] = ()) -> tuple[object, list[int]]:
        """Send `msg` and wait for the one reply (for sockets used request/reply only)."""
        with self.rpc_lock:
            self.send(msg, fds)
            return self.recv()

    def _recv_header(self) -> tuple[bytes, list[int]]:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, _HEADER.size, MAX_FDS)
        except (ConnectionResetError, OSError) as exc:
            raise ChannelClosed(f"channel closed: {exc}") from exc
        if not data:
            raise ChannelClosed("the other end closed the channel")
        if len(data) < _HEADER.size:
            try:
                data += self._recv_exact(_HEADER.size - len(data))
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
        return data, list(fds)

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except (ConnectionResetError, OSError) as exc:
                raise ChannelClosed(f"channel closed: {exc}") from exc
            if k == 0:
                raise ChannelClosed("the other end closed the channel mid-message")
            got += k
        return bytes(buf)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close our end (idempotent); a reader blocked in `recv` gets ChannelClosed."""
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def channel_pair() -> tuple[Channel, Channel]:
    """Two connected channels; pass one end's `fileno()` to a child with `pass_fds`."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Channel(a), Channel(b)


def channel_from_fd(fd: int) -> Channel:
    """The channel over an inherited socket fd (in the child process)."""
    return Channel(socket.socket(fileno=fd))
