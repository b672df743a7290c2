"""The framed-pickle channel: messages in order, fds carried, EOF seen as ChannelClosed."""

from __future__ import annotations

import os
import threading

import pytest

from elasticserve.procs.transport import Channel, ChannelClosed, channel_pair


def test_messages_arrive_whole_and_in_order() -> None:
    a, b = channel_pair()
    big = bytes(range(256)) * 4096  # 1 MiB: larger than the socket buffer, needs a reader
    reader = threading.Thread(target=lambda: got.extend(b.recv()[0] for _ in range(3)))
    got: list[object] = []
    reader.start()
    a.send({"n": 1})
    a.send(big)
    a.send(("tail", [1, 2, 3]))
    reader.join(10)
    assert got == [{"n": 1}, big, ("tail", [1, 2, 3])]


def test_fds_ride_with_their_message() -> None:
    a, b = channel_pair()
    fd = os.memfd_create("t")
    os.write(fd, b"shared bytes")
    a.send("here", [fd])
    msg, fds = b.recv()
    assert msg == "here" and len(fds) == 1 and fds[0] != fd
    assert os.pread(fds[0], 12, 0) == b"shared bytes"  # the same file, another descriptor
    os.close(fds[0])
    os.close(fd)


def test_closed_peer_raises_channel_closed() -> None:
    a, b = channel_pair()
    a.close()
    with pytest.raises(ChannelClosed):
        b.recv()
    with pytest.raises(ChannelClosed):
        b.send("nobody listens")
        b.send("nobody listens" * 100000)


def test_request_waits_for_its_reply() -> None:
    a, b = channel_pair()

    def echo() -> None:
        msg, _ = b.recv()
        b.send(("echo", msg))

    t = threading.Thread(target=echo)
    t.start()
    assert a.request(7) == (("echo", 7), [])
    t.join(5)


class _Recorder:
    """A socket stand-in that records each write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def sendall(self, data: bytes | memoryview) -> None:
        self.writes.append(bytes(data))


def test_a_message_without_fds_is_one_write() -> None:
    """Header and payload go out together, so the reader wakes once per message."""
    sock = _Recorder()
    Channel(sock).send({"step": 1})  # type: ignore[arg-type]
    Channel(sock).send(list(range(1000)))  # type: ignore[arg-type]
    assert len(sock.writes) == 2
    a, b = channel_pair()
    a.sock.sendall(sock.writes[0] + sock.writes[1])  # the frames as written read back whole
    assert b.recv() == ({"step": 1}, []) and b.recv() == (list(range(1000)), [])


def test_large_message_with_fds_arrives_whole() -> None:
    a, b = channel_pair()
    big = bytes(range(256)) * 4096  # more than one sendmsg takes: the rest follows
    fd = os.memfd_create("t")
    got: list[tuple[object, list[int]]] = []
    reader = threading.Thread(target=lambda: got.append(b.recv()))
    reader.start()
    a.send(big, [fd])
    reader.join(10)
    assert got[0][0] == big and len(got[0][1]) == 1
    os.close(got[0][1][0])
    os.close(fd)
