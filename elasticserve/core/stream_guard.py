"""The TPOT guard of layer-wise residency (`CacheConfig.stream_tpot_ms`). Torch-free.

Every streamed sequence copies its whole KV, one layer at a time, into the device stage on
every step, so each one streamed makes every step (and so every decode's TPOT) slower. The
guard predicts the step time if `blocks` host blocks were streamed:

    predicted = resident step seconds + blocks x seconds per streamed block

from two moving averages the engine feeds after each step (`observe`): the step's wall seconds
less its stage-copy seconds (what the step costs without streaming), and the stage-copy seconds
per streamed block. The copies partly overlap the forward pass (a helper thread), so the
resident part is underestimated by what overlapped and the block part counted in full: for the
blocks streamed now the prediction is the measured step time again. Prefill steps are in the
average too: a decode waits for them, they are part of its TPOT. Hence a long average (alpha
0.05: about the last 20 steps, a decode's life in the bench): with 0.25 a prefill stall was
forgotten within a few steps, the guard reopened between admissions and TPOT barely moved
(`bench host_tier`, 24-29 ms P50 vs 32 ms unguarded at a 20 ms target; 0.05: 19 ms).

Cold (no step measured yet) it allows anything; with steps but no copy measured yet, the
block cost counts as 0 (the prediction is then a lower bound: still refused once the resident
step alone is over the target).
"""

from __future__ import annotations

__all__ = ["StreamGuard"]


class StreamGuard:
    """Numbers in (`observe`), decisions out (`allows`); `target_ms` None: always allows."""

    def __init__(self, target_ms: float | None, alpha: float = 0.05) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.target_s = None if target_ms is None else target_ms / 1000
        self.alpha = alpha  # weight of the newest step: ~the last 1/alpha steps count
        self.step_s: float | None = None  # resident step seconds (EWMA)
        self.block_s: float | None = None  # stage-copy seconds per streamed block (EWMA)

    @property
    def enabled(self) -> bool:
        return self.target_s is not None

    def observe(self, step_s: float, copy_s: float, blocks: int) -> None:
        """One step took `step_s` seconds, `copy_s` of them copying `blocks` streamed host
        blocks into the stage (0, 0 when nothing was streamed)."""
        self.step_s = self._ewma(self.step_s, max(0.0, step_s - copy_s))
        if blocks > 0:
            self.block_s = self._ewma(self.block_s, copy_s / blocks)

    def predict_s(self, blocks: int) -> float | None:
        """Predicted step seconds with `blocks` streamed host blocks; None when cold."""
        if self.step_s is None:
            return None
        return self.step_s + blocks * (self.block_s or 0.0)

    def allows(self, blocks: int) -> bool:
        """Whether streaming `blocks` host blocks in all keeps the step within the target."""
        if self.target_s is None:
            return True
        predicted = self.predict_s(blocks)
        return predicted is None or predicted <= self.target_s

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.alpha * (new - old)
