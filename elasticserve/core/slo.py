"""SLO-aware ordering, preemption and admission: slack from a step-time model. Torch-free.

Each request may carry latency targets (``SamplingParams.slo_ttft_ms`` / ``slo_tpot_ms``, else
the model's ``SchedulerConfig`` defaults). Its *deadline* is ``arrival + ttft`` before its first
token, and ``arrival + ttft + tpot x tokens generated`` after it. Its *slack* is
``deadline - now - predicted time to its next token``, where the prediction counts the steps
its remaining prefill needs (chunks of at most ``long_prefill_token_threshold`` tokens, or the
step's whole budget) at the cost of a full step (``StepCost``: ``a + b*tokens + c*context``).

The "slo" policy admits waiting groups by (priority, hopeless, slack): least slack first among
those that can still make their target, then the hopeless (negative slack) in arrival order,
so a request that will miss anyway does not make others miss too. Priority still wins. The
preemption victim is the group with the most slack among the least important ones. A request
without targets has infinite slack: it goes after every request that has one (FCFS among
themselves) and is preempted first.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from elasticserve.config import SchedulerConfig
from elasticserve.errors import SLOUnattainableError
from elasticserve.request import SequenceGroup

INF = math.inf


@dataclass(frozen=True, slots=True)
class StepCost:
    """Seconds of one engine step: ``a + b * tokens computed + c * context tokens read``.

    A linear stand-in for the simulator's roofline (sim/cost_model.py, which core cannot
    import); fit it to an engine's step trace, or pass the fitted values as
    ``SchedulerConfig.step_cost`` (``EngineArgs.slo_step_cost``)."""

    a: float
    b: float
    c: float

    def step_s(self, tokens: int, context: int) -> float:
        return self.a + self.b * tokens + self.c * context


# a step may take at most this share of the tightest TTFT target (slo policy): a request that
# arrives during a long prefill then waits one short step, not the whole prefill
STEP_SHARE = 0.25
MIN_STEP_TOKENS = 64  # and a step computes at least this many tokens beyond its decodes


class StepCostFit:
    """The step-time model fitted to an engine's own steps as it runs: least squares of
    ``seconds = a + b*tokens + c*context`` over the last ``window`` steps, refitted every
    ``every`` steps. A coefficient the data cannot determine (e.g. no context yet) keeps the
    prior's value; none goes negative."""

    def __init__(self, prior: StepCost, window: int = 256, every: int = 16) -> None:
        self.cost = prior
        self.window, self.every = window, every
        self.samples: deque[tuple[float, float, float]] = deque(maxlen=window)
        self._since = 0

    def observe(self, tokens: int, context: int, seconds: float) -> StepCost:
        """Add one step; returns the model (refitted every ``every`` steps)."""
        if tokens > 0 and seconds > 0:
            self.samples.append((float(tokens), float(context), seconds))
            self._since += 1
        if self._since >= self.every and len(self.samples) >= self.every:
            self._since = 0
            self.cost = self._fit()
        return self.cost

    def _fit(self) -> StepCost:
        prior = (self.cost.a, self.cost.b, self.cost.c)
        rows = [(1.0, t, c) for t, c, _ in self.samples]
        ys = [y for _, _, y in self.samples]
        keep = [j for j in range(3) if any(r[j] != rows[0][j] for r in rows) or j == 0]
        coef = _least_squares([[r[j] for j in keep] for r in rows], ys)
        if coef is None:
            return self.cost
        fitted = list(prior)
        for j, value in zip(keep, coef, strict=True):
            fitted[j] = max(0.0, value)
        return StepCost(*fitted)


def _least_squares(x: list[list[float]], y: list[float]) -> list[float] | None:
    """Solve the normal equations (Gaussian elimination, partial pivoting); None if singular."""
    n = len(x[0])
    a = [[sum(r[i] * r[j] for r in x) for j in range(n)] + [sum(r[i] * v for r, v in
                                                             zip(x, y, strict=True))]
         for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12 * max(1.0, abs(a[col][col])):
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [v - f * w for v, w in zip(a[r], a[col], strict=True)]
    return [a[i][n] / a[i][i] for i in range(n)]


def _remaining(group: SequenceGroup) -> tuple[int, int]:
    """(tokens still to compute before the next sample, tokens generated so far)."""
    live = group.live_seqs() or group.seqs
    return (max(s.num_uncomputed for s in live),
            max(len(s.token_ids) - s.prompt_len for s in live))


class SloPolicy:
    """Slack, order, victim and admission decisions under one scheduler config."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.cost = StepCost(*config.step_cost)
        self.budget = config.max_num_batched_tokens
        cap = config.long_prefill_token_threshold
        self.chunk = min(cap, self.budget) if cap > 0 else self.budget
        self.step_tokens = self.budget  # the last step's cap (step_token_cap), for predictions
        self.policy = config.policy
        self._ttft_s = None if config.slo_ttft_ms is None else config.slo_ttft_ms / 1000
        self._tpot_s = None if config.slo_tpot_ms is None else config.slo_tpot_ms / 1000

    def step_token_cap(self, waiting: Iterable[SequenceGroup],
                       running: Iterable[SequenceGroup], tokens: int) -> int:
        """The step's token budget under the slo policy: at most what keeps a step within
        STEP_SHARE of the tightest TTFT target in play (the model's default counts: the next
        arrival has it), never below the running decodes plus MIN_STEP_TOKENS."""
        running = list(running)
        ttfts = [t for g in (*waiting, *running) if (t := self.targets(g)[0]) is not None]
        if self._ttft_s is not None:
            ttfts.append(self._ttft_s)
        if not ttfts or self.cost.b <= 0:
            return tokens
        context = sum(s.num_computed_tokens for g in running for s in g.seqs)
        decodes = sum(len(g.seqs) for g in running if _remaining(g)[0] <= 1)
        room = (STEP_SHARE * min(ttfts) - self.cost.a - self.cost.c * context) / self.cost.b
        self.step_tokens = min(tokens, max(int(room), decodes + MIN_STEP_TOKENS))
        return self.step_tokens

    def waiting_reserve(self, waiting: Iterable[SequenceGroup], running: Iterable[SequenceGroup],
                        now: float, tokens: int) -> int:
        """Tokens of this step kept from the running prefills for the waiting requests that can
        still make their TTFT target (their prompts, at most half the step): a long prefill
        already running must not hold every step while short requests queue behind it."""
        step_s = self.full_step_s(running)
        want = sum(_remaining(g)[0] for g in waiting
                   if self.targets(g)[0] is not None and self.slack(g, now, step_s) >= 0)
        return min(want, tokens // 2)

    def targets(self, group: SequenceGroup) -> tuple[float | None, float | None]:
        """(TTFT, TPOT) targets in seconds: the request's own, else the model's defaults."""
        p = group.params
        ttft = self._ttft_s if p.slo_ttft_ms is None else p.slo_ttft_ms / 1000
        tpot = self._tpot_s if p.slo_tpot_ms is None else p.slo_tpot_ms / 1000
        return ttft, tpot

    def full_step_s(self, running: Iterable[SequenceGroup]) -> float:
        """A step with the whole token budget, reading every running sequence's context: what
        each step costs while a queue waits."""
        context = sum(s.num_computed_tokens for g in running for s in g.seqs)
        return self.cost.step_s(min(self.budget, self.step_tokens), context)

    def slack(self, group: SequenceGroup, now: float, step_s: float) -> float:
        """Seconds to spare before ``group`` misses its next deadline (inf: no target)."""
        remaining, generated = _remaining(group)
        ttft, tpot = self.targets(group)
        if generated == 0:
            if ttft is None:
                return INF
            deadline = group.arrival_time + ttft
        else:
            if tpot is None:
                return INF
            deadline = group.arrival_time + (ttft or 0.0) + tpot * generated
        return deadline - now - math.ceil(remaining / min(self.chunk, self.step_tokens)) * step_s

    def _key(self, group: SequenceGroup, now: float, step_s: float) -> tuple[int, int, float]:
        slack = self.slack(group, now, step_s)
        if slack < 0:
            return group.priority, 1, group.arrival_time  # hopeless: after every feasible one
        return group.priority, 0, slack

    def order_waiting(self, waiting: deque[SequenceGroup], now: float,
                      running: Iterable[SequenceGroup]) -> deque[SequenceGroup]:
        """The waiting queue in admission order (stable: ties keep their order)."""
        step_s = self.full_step_s(running)
        return deque(sorted(waiting, key=lambda g: self._key(g, now, step_s)))

    def victim(self, candidates: list[SequenceGroup], now: float,
               running: Iterable[SequenceGroup]) -> SequenceGroup:
        """The least important group with the most slack (ties: the latest of them)."""
        step_s = self.full_step_s(running)
        best = max(range(len(candidates)), key=lambda i: (
            candidates[i].priority, self.slack(candidates[i], now, step_s), i))
        return candidates[best]

    def predicted_ttft(self, group: SequenceGroup, waiting: Iterable[SequenceGroup],
                       running: list[SequenceGroup], now: float) -> float:
        """Seconds until ``group``'s first token if queued now: the prefill tokens queued
        ahead of it plus its own, at the budget the running decodes leave per step."""
        step_full = self.full_step_s(running)
        if self.policy == "slo":
            mine = self._key(group, now, step_full)
            ahead_groups = [g for g in waiting if self._key(g, now, step_full) <= mine]
        else:
            ahead_groups = [g for g in waiting if g.priority <= group.priority]
        ahead = sum(_remaining(g)[0] for g in ahead_groups)
        decodes = 0
        for g in running:
            left = _remaining(g)[0]
            if left > 1:
                ahead += left
            else:
                decodes += len(g.seqs)
        own = _remaining(group)[0]
        per_step = max(1, self.budget - decodes)
        steps = max(math.ceil((ahead + own) / per_step), math.ceil(own / self.chunk))
        context = sum(s.num_computed_tokens for g in running for s in g.seqs)
        tokens = min(self.budget, ahead + own + decodes)
        return steps * self.cost.step_s(tokens, context)

    def check_admission(self, group: SequenceGroup, waiting: Iterable[SequenceGroup],
                        running: list[SequenceGroup], now: float) -> None:
        """Raise SLOUnattainableError if ``group`` is predicted to miss its TTFT target."""
        ttft, _ = self.targets(group)
        if ttft is None:
            return
        waited = max(0.0, now - group.arrival_time)
        predicted = waited + self.predicted_ttft(group, waiting, running, now)
        if predicted <= ttft:
            return
        raise SLOUnattainableError(
            f"request {group.request_id!r} would miss its time-to-first-token target: "
            f"predicted {predicted * 1000:.0f} ms > slo_ttft_ms={ttft * 1000:g} with the queue "
            f"ahead of it; retry later",
            retry_after_s=max(1, math.ceil(predicted - ttft)))
