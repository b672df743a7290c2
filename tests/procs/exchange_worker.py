"""A KV-group member process for test_page_exchange.py: a `RemotePageBroker` + KV range whose
pages come from the page broker in the test process (no engine: the test drives the pages).

argv: worker pages_fd control_fd page_size kv_max_bytes group
Control messages (each answered on the control channel):
("grow", n) -> ("grown", pages mapped); ("fill", index, seed) -> ("crc", crc of the page);
("crc", index) -> ("crc", crc); ("offer", handoff_id, indices) -> ("offered",);
("withdraw", handoff_id) -> ("withdrawn", pages changed); ("exit",) ends the process.
"""

from __future__ import annotations

import sys
import zlib

import torch


def crc(page: torch.Tensor) -> int:
    return zlib.crc32(page.numpy().tobytes())


def main(argv: list[str]) -> None:
    from elasticserve.memory.vtensor import VirtualTensor
    from elasticserve.procs.page_client import RemotePageBroker
    from elasticserve.procs.transport import channel_from_fd

    worker, pages_fd, control_fd, page, kv_max, group = argv
    pages, control = channel_from_fd(int(pages_fd)), channel_from_fd(int(control_fd))
    broker = RemotePageBroker(pages, worker, int(kv_max), int(page), kv_group=group)
    broker.attach_model(0)
    vt = VirtualTensor(broker.backend, int(kv_max), torch.uint8, (int(page),))
    while True:
        msg, _ = control.recv()
        assert isinstance(msg, tuple)
        if msg[0] == "exit":
            return
        if msg[0] == "grow":
            reply: tuple = ("grown", vt.map_pages(broker.grant(msg[1], msg[1])))
        elif msg[0] == "fill":
            gen = torch.Generator().manual_seed(msg[2])
            vt.tensor[msg[1]] = torch.randint(0, 256, (int(page),), generator=gen,
                                              dtype=torch.uint8)
            reply = ("crc", crc(vt.tensor[msg[1]]))
        elif msg[0] == "crc":
            reply = ("crc", crc(vt.tensor[msg[1]]))
        elif msg[0] == "offer":
            broker.offer(msg[1], msg[2])
            reply = ("offered",)
        else:
            reply = ("withdrawn", broker.withdraw(msg[1]))
        control.send(reply)


if __name__ == "__main__":
    main(sys.argv[1:])
