"""Sleep and wake of one engine: drop the weights and every KV page, reload them later.

A mixin of `LLMEngine`, kept apart because a wake can fail (a corrupt or missing checkpoint)
and undoing it touches the budget's books, the KV storage and the scheduler.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from elasticserve.engine.protocol import ModelLoadError

if TYPE_CHECKING:
    from elasticserve.config import EngineConfig
    from elasticserve.core.kv_pages import ModelBroker
    from elasticserve.core.scheduler import Scheduler
    from elasticserve.engine.kv_storage import KVStorage
    from elasticserve.engine.weights import WeightsSource
    from elasticserve.engine.workspace import WorkspaceArena
    from elasticserve.models.llama import CausalLM
    from elasticserve.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class SleepWake:
    """`sleep()` / `wake()` for an engine with these attributes (LLMEngine sets them)."""

    config: EngineConfig
    kv: KVStorage
    broker: ModelBroker | None
    scheduler: Scheduler
    runner: ModelRunner
    model: CausalLM
    weights: WeightsSource
    asleep: bool
    sleeps: int
    wakes: int
    wake_latencies_s: list[float]

    def _load_model(self) -> CausalLM:
        raise NotImplementedError

    def _make_workspace(self) -> WorkspaceArena | None:
        """The step workspace arena (engine/workspace.py) when `runtime_memory_from_budget` is
        set: built here, beside sleep, which unmaps it with the KV pages."""
        from elasticserve.engine.workspace import make_workspace

        return make_workspace(self)  # type: ignore[arg-type]  # self is an LLMEngine

    def sleep(self) -> int:
        """Give every KV page back and drop the weights (re-read from the checkpoint on wake).

        Running requests are preempted (swap or recompute) and resume after the wake. Returns
        the KV pages unmapped; the caller (the arbiter's reclaim or an admin) accounts them.
        """
        with self.kv.lock:
            if self.asleep:
                return 0
            pages = self.kv.release_all()
            if self.kv.workspace is not None:  # its pages are booked with the KV's
                pages += self.kv.workspace.release_all()
            self.runner.model = None  # type: ignore[assignment]
            del self.model
            self.weights.release()  # a shared copy leaves memory when its last user lets go
            self.asleep = True
            self.sleeps += 1
            return pages

    def wake(self) -> bool:
        """Reload the weights and map the starting KV pages; False if the budget has no room.

        Raises ModelLoadError if the weights cannot be loaded: the model is then asleep again
        with nothing booked (weights and pages given back to the broker), and the next wake
        tries again."""
        with self.kv.lock:
            if not self.asleep:
                return True
            if self.broker is not None and not self.broker.wake():
                return False
            start = time.monotonic()
            try:
                self.model = self._load_model()
                self.model.use_native_ops(self.runner.native_decode)
                self.runner.model = self.model
                self.kv.remap_initial()
            except Exception as exc:
                self._cancel_wake()
                # the cause names server paths: it goes to the log, not to clients
                logger.exception("waking model %s failed", self.config.model.path)
                raise ModelLoadError("the model's weights could not be loaded; the server "
                                     "log has the details") from exc
            self.asleep = False
            self.wakes += 1
            self.wake_latencies_s.append(time.monotonic() - start)
            logger.info("woke %s in %.2f s", self.config.model.path, self.wake_latencies_s[-1])
            return True

    def _cancel_wake(self) -> None:
        """Back to the state sleep() left: no weights, no pages, nothing booked."""
        self.runner.model = None  # type: ignore[assignment]
        if vars(self).pop("model", None) is not None:
            self.weights.release()
        pages = self.kv.release_all()  # starting pages remap_initial may have mapped
        if self.broker is not None:
            if pages:
                self.broker.release(pages)
            self.broker.cancel_wake()

    def _wake_for_work(self) -> bool:
        if not self.scheduler.has_unfinished():
            return False
        try:
            if self.wake():
                return True
        except ModelLoadError as exc:
            # the requests waiting on this wake fail (step reports them); later ones try again
            self.scheduler.fail_all(str(exc))
            return False
        time.sleep(0.005)  # no room yet: back-pressure, not a busy loop
        return False

