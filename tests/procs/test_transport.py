"""The framed-pickle channel: messages in order, fds carried, EOF seen as ChannelClosed."""

from __future__ import annotations

import os
import threading

import pytest

from elasticserve.procs.transport import ChannelClosed, channel_pair


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
