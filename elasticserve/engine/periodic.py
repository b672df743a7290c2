"""Background housekeeping threads that never keep their owner alive."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol, TypeVar


class Closable(Protocol):
    """An owner whose housekeeping stops once `closed` is set."""

    closed: bool


OwnerT = TypeVar("OwnerT", bound=Closable)


def run_periodically(owner: OwnerT, interval_s: float, method: Callable[[OwnerT], None],
                     name: str) -> None:
    """Call `method(owner)` every `interval_s` on a daemon thread until the owner is garbage
    or has `closed` set; holds only a weak reference, so it never keeps the owner alive."""
    ref = weakref.ref(owner)

    def loop() -> None:
        while True:
            time.sleep(interval_s)
            target = ref()
            if target is None or target.closed:
                return
            method(target)
            del target

    threading.Thread(target=loop, name=name, daemon=True).start()
