"""Prefill/decode disaggregation inside one engine: the prefill side hands a request over after
its first token, the decode side adopts it by its KV.

Prefill (`PrefillSide`): after the step that sampled a request's first token, the request
leaves the scheduler with its KV blocks still held (`Scheduler.detach`), its KV goes into a
`KVPayload` (lent pages or copied bytes, see engine/kv_connector.py) and a `KVHandOff` with
the sequences' state comes out of the step. Lent blocks leave the prefix cache at once (the
decode worker may own their pages from the offer on) and are pinned against compaction; every
block stays put until `release`, which takes back blanks for the lent pages and frees them all.

Decode (`DecodeSide`): `adopt` queues the request with `Sequence.external_kv_tokens` set, so
the scheduler admits it by allocating blocks for the KV, not by recomputing it; in the step that
admits it and before the forward pass, the connector fills those blocks. A receive that fails
(the prefill worker died, the offer was withdrawn) ends that request with an error only.

Requests the decode side could not continue identically (beam search, structured outputs, a
sequence already finished) are not handed over: they run to the end on the prefill side.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from elasticserve.engine.kv_connector import KVConnector, KVPayload, PageOwnershipError
from elasticserve.outputs import SchedulerOutput
from elasticserve.request import Sequence, SequenceGroup, next_seq_id
from elasticserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from elasticserve.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SeqHandOff:
    """One sequence's state: its tokens (prompt + first output) and the sender's blocks."""

    index: int
    prompt_len: int
    token_ids: tuple[int, ...]
    cumulative_logprob: float
    output_logprobs: tuple[dict[int, float], ...]
    output_text: str
    blocks: tuple[int, ...]
    rng_state: bytes | None = None


@dataclass(frozen=True, slots=True)
class KVHandOff:
    """A request moving from a prefill engine to a decode engine, KV included."""

    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    priority: int
    stream: bool
    arrival_time: float
    first_token_time: float
    handed_at: float  # time.monotonic() of the sender (one clock for processes of a host)
    num_cached_tokens: int
    prompt_logprobs: Any
    seqs: tuple[SeqHandOff, ...]
    kv: KVPayload


class KVHandedOver(Exception):
    """Ends a request's stream on the prefill side: it continues on a decode worker."""

    def __init__(self, handoff: KVHandOff) -> None:
        super().__init__(f"request {handoff.request_id!r} handed over for decode")
        self.handoff = handoff


# upper bounds (s) of the hand-off latency histogram: hand-off sent -> KV in the decode blocks
LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


@dataclass(slots=True)
class HandOffStats:
    sequences: int = 0  # sequences handed over (sender) or adopted (receiver)
    pages: int = 0  # pages lent (sender) or taken (receiver)
    bytes_copied: int = 0
    # receiver: cumulative counts per LATENCY_BOUNDS bucket (the last one is +Inf), and the sum
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))
    latency_sum_s: float = 0.0

    def observe(self, seconds: float) -> None:
        self.latency_sum_s += seconds
        for i, bound in enumerate((*LATENCY_BOUNDS, float("inf"))):
            if seconds <= bound:
                self.latency_buckets[i] += 1


def role_stats(role: PDRole | None) -> dict[str, Any]:
    """An engine's hand-off counters for `stats()`: what a decode side received (the
    `kv_handoff_*` metrics) or what a prefill side sent (`kv_handoff_sent_*`)."""
    if not isinstance(role, PrefillSide | DecodeSide):
        return {}
    s = role.stats
    key = "kv_handoff" if isinstance(role, DecodeSide) else "kv_handoff_sent"
    out: dict[str, Any] = {f"{key}_sequences": s.sequences, f"{key}_pages": s.pages,
                           f"{key}_bytes_copied": s.bytes_copied}
    if isinstance(role, DecodeSide):
        out["kv_handoff_latency_buckets"] = list(s.latency_buckets)
        out["kv_handoff_latency_sum_s"] = s.latency_sum_s
    return out


def block_checksums(engine: LLMEngine, request_id: str) -> list[list[int]]:
    """Per sequence, the CRC32 of each KV block `request_id` holds in `engine` (held for a
    hand-off, or live): what a test compares across the two workers' mappings."""
    with engine.kv.lock:
        pd, group = engine.pd, engine.groups.get(request_id)
        if isinstance(pd, PrefillSide) and request_id in pd.held:
            group = pd.held[request_id][0]
        if group is None:
            raise ValueError(f"request_id {request_id!r} holds no KV here")
        manager, rows = engine.kv_manager, engine.kv.tensor
        return [[zlib.crc32(rows[b].cpu().numpy().tobytes()) for b in
                 manager.block_table(s.seq_id)] for s in group.seqs if manager.has_seq(s.seq_id)]


def can_hand_off(group: SequenceGroup) -> bool:
    """Whether a decode engine can continue `group` exactly as this one would."""
    params = group.params
    return (not group.is_beam_search and params.structured_outputs is None
            and not group.pending_children and bool(group.seqs)
            and all(not s.is_finished and s.num_output_tokens >= 1 for s in group.seqs))


class PDRole(Protocol):
    """What the engine's step calls on its role (engine/llm_engine.py)."""

    def before_execute(self, out: SchedulerOutput) -> None: ...
    def hand_off(self, out: SchedulerOutput) -> list[KVHandOff]: ...
    def forget(self, request_id: str) -> None: ...


class PrefillSide:
    """The prefill role of an engine (see module docstring)."""

    def __init__(self, engine: LLMEngine, connector: KVConnector) -> None:
        require_resident_kv(engine)
        self.engine = engine
        self.connector = connector
        self.held: dict[str, tuple[SequenceGroup, tuple[int, ...]]] = {}  # id -> (group, lent)
        self.stats = HandOffStats()
        engine.kv.pages.pinned_rows = self.pinned_rows

    def pinned_rows(self) -> int:
        return max((max(lent) + 1 for _, lent in self.held.values() if lent), default=0)

    def hand_off(self, out: SchedulerOutput) -> list[KVHandOff]:
        """Detach every request that sampled its first token in this step (under the KV lock)."""
        handed = []
        for item in out.scheduled:
            group = self.engine.groups.get(item.request_id)
            if (group is None or not item.sample_seq_ids or group.error is not None
                    or item.request_id in self.held or not can_hand_off(group)):
                continue
            if self.engine.scheduler.detach(group.request_id) is None:
                continue
            handed.append(self._export(group))
        return handed

    def _export(self, group: SequenceGroup) -> KVHandOff:
        manager, runner = self.engine.kv_manager, self.engine.runner
        tables = [manager.block_table(s.seq_id) for s in group.seqs]
        blocks = list(dict.fromkeys(b for table in tables for b in table))
        lendable = {b for b in blocks if manager.pool.ref_count(b) == 1}
        payload = self.connector.send_blocks(group.request_id, blocks, lendable)
        lent = tuple(b for b, _ in payload.pages)
        for block in lent:
            # from the offer on, the decode worker may own this page: a prompt that hit it in
            # the prefix cache would read a blank page once the offer is withdrawn
            manager.pool.forget(block)
        self.held[group.request_id] = (group, lent)
        self.stats.sequences += len(group.seqs)
        self.stats.pages += len(lent)
        self.stats.bytes_copied += payload.bytes_copied
        seqs = tuple(SeqHandOff(
            s.index, s.prompt_len, tuple(s.token_ids), s.cumulative_logprob,
            tuple(s.output_logprobs), s.output_text, tuple(table),
            runner.generator_state(s.seq_id)) for s, table in zip(group.seqs, tables, strict=True))
        assert group.first_token_time is not None
        return KVHandOff(
            group.request_id, group.prompt, tuple(group.prompt_token_ids), group.params,
            group.priority, group.stream, group.arrival_time, group.first_token_time,
            time.monotonic(), group.num_cached_prompt_tokens, group.prompt_logprobs, seqs,
            payload)

    def release(self, request_id: str) -> bool:
        """The hand-off is over: take back lent pages' blanks and free every block. False if
        `request_id` holds nothing here (released already)."""
        engine = self.engine
        with engine.kv.lock:
            entry = self.held.pop(request_id, None)
            if entry is None:
                return False
            group, lent = entry
            try:
                moved = self.connector.done(request_id)
            except BaseException:
                # whose pages these are is unknown now: never reuse them (the worker's step
                # loop ends on this error and the broker takes every page back)
                self.held[request_id] = entry
                raise
            engine.scheduler.free_detached(group)
            if moved:
                logger.debug("hand-off %s: %d pages changed owner", request_id, len(lent))
            return True

    def release_all(self) -> int:
        return sum(self.release(rid) for rid in list(self.held))

    def before_execute(self, out: SchedulerOutput) -> None:
        """Nothing arrives on the prefill side."""

    def forget(self, request_id: str) -> None:
        """An abort: a held request is freed by `release` only (the front sends it)."""


def require_resident_kv(engine: LLMEngine) -> None:
    """A ValueError naming layerwise_residency when `engine` may stream a sequence's KV from
    the host tier: a streamed table holds host-tier block ids, which a hand-off would read as
    device blocks. Not supported with prefill/decode roles yet."""
    if engine.cache_config.layerwise_residency:
        raise ValueError("layerwise_residency does not work with prefill/decode roles (--pd) "
                         "yet: a streamed sequence's blocks are host-tier ids, not device blocks")


class DecodeSide:
    """The decode role of an engine (see module docstring)."""

    def __init__(self, engine: LLMEngine, connector: KVConnector) -> None:
        require_resident_kv(engine)
        self.engine = engine
        self.connector = connector
        self.pending: dict[str, KVHandOff] = {}
        self.received: list[str] = []  # reported to the front after each step
        self.stats = HandOffStats()

    def adopt(self, handoff: KVHandOff) -> None:
        """Queue a handed-over request; its KV is received when the scheduler admits it."""
        engine = self.engine
        rid = handoff.request_id
        if rid in engine.groups:
            raise ValueError(f"request_id {rid!r} is already in use")
        seqs = []
        for s in handoff.seqs:
            seq = Sequence(next_seq_id(), s.prompt_len, list(s.token_ids), index=s.index,
                           cumulative_logprob=s.cumulative_logprob,
                           output_logprobs=list(s.output_logprobs), output_text=s.output_text,
                           external_kv_tokens=len(s.token_ids) - 1)
            if s.rng_state is not None:
                engine.runner.set_generator_state(seq.seq_id, s.rng_state)
            seqs.append(seq)
        group = SequenceGroup(rid, handoff.prompt, list(handoff.prompt_token_ids),
                              handoff.params, handoff.arrival_time, seqs, handoff.priority,
                              first_token_time=handoff.first_token_time,
                              prompt_logprobs=handoff.prompt_logprobs,
                              num_cached_prompt_tokens=handoff.num_cached_tokens,
                              stream=handoff.stream)
        engine.scheduler.add(group, admission=False)
        engine.groups[rid] = group
        self.pending[rid] = handoff

    def forget(self, request_id: str) -> None:
        """An abort before the KV arrived: nothing to receive any more."""
        self.pending.pop(request_id, None)

    def hand_off(self, out: SchedulerOutput) -> list[KVHandOff]:
        """Nothing leaves the decode side."""
        return []

    def before_execute(self, out: SchedulerOutput) -> None:
        """Fill the blocks of the requests admitted in this step with their handed-over KV."""
        groups = self.engine.groups
        for gone in [rid for rid in self.pending
                     if rid not in groups or groups[rid].is_finished]:
            del self.pending[gone]  # failed or ended before its KV arrived (not by an abort)
        failed: set[str] = set()
        for item in out.scheduled:
            handoff = self.pending.get(item.request_id)
            group = self.engine.groups.get(item.request_id)
            if handoff is None or group is None:
                continue
            del self.pending[item.request_id]
            try:
                self._receive(handoff, group)
            except PageOwnershipError:
                raise  # this process's mappings are wrong: it must end (see the error)
            except Exception as exc:  # noqa: BLE001 - this request only
                logger.warning("request %s: KV hand-off failed: %s", item.request_id, exc)
                msg = f"the KV hand-off from the prefill worker failed: {exc}"
                self.engine.scheduler.abort(item.request_id, error=msg)
                failed.add(item.request_id)
            self.received.append(item.request_id)
        if failed:
            out.scheduled = [s for s in out.scheduled if s.request_id not in failed]

    def _receive(self, handoff: KVHandOff, group: SequenceGroup) -> None:
        manager = self.engine.kv_manager
        pairs: list[tuple[int, int]] = []
        for s, seq in zip(handoff.seqs, group.seqs, strict=True):
            pairs += zip(s.blocks, manager.block_table(seq.seq_id), strict=False)
        got = self.connector.receive_blocks(handoff.kv, pairs)
        self.stats.sequences += len(group.seqs)
        self.stats.pages += got.pages
        self.stats.bytes_copied += got.bytes_copied
        self.stats.observe(time.monotonic() - handoff.handed_at)

    def pop_received(self) -> list[str]:
        received, self.received = self.received, []
        return received
