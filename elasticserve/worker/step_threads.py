"""Torch threads per step: one for small steps, all of them for large ones.

Measured on a 2-core machine with OMP_WAIT_POLICY=PASSIVE (docs/BENCHMARKS.md, `peer`): a decode
step of a few sequences is bound by memory and by ~100 small ops, and waking the second OpenMP
thread for each op costs more than it saves (small model, greedy, B=1: 157 vs 113 tok/s; B=8:
784 vs 546; B=32: 1190 vs 860 with one thread), while a prefill chunk of hundreds of tokens is
compute-bound and gains from every core. So a step of at most `small_step_tokens` tokens runs on
one thread, and a larger one on the engine's configured count.
"""

from __future__ import annotations

import torch


class StepThreads:
    """Sets `torch.set_num_threads` per step (only when the count changes)."""

    def __init__(self, max_threads: int, small_step_tokens: int) -> None:
        if max_threads < 1 or small_step_tokens < 0:
            raise ValueError(f"need max_threads >= 1 and small_step_tokens >= 0, got "
                             f"{max_threads}, {small_step_tokens}")
        self.max_threads = max_threads
        self.small_step_tokens = small_step_tokens
        self.current = torch.get_num_threads()

    def threads_for(self, tokens: int) -> int:
        return 1 if tokens <= self.small_step_tokens else self.max_threads

    def apply(self, tokens: int) -> int:
        """Use the right count for a step of `tokens` tokens; returns it."""
        want = self.threads_for(tokens)
        if want != self.current:
            torch.set_num_threads(want)
            self.current = want
        return want
