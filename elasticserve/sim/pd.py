"""Prefill/decode disaggregation (the DistServe / vLLM P/D layout) and its colocated baseline.

A layout is ``P:D``: P prefill instances and D decode instances of one model, each on its own
GPU (``SimConfig.num_gpus`` GPUs, tensor-parallel), each a one-model :class:`Simulator` with the
real Scheduler, KVCacheManager and BlockPool and a static KV cache (a dedicated GPU maps its
memory once). ``0:N`` is N colocated instances, each running prefill and decode together.

* A request goes to the instance with the fewest unfinished requests (prefill instances in P/D).
* A prefill instance runs chunked prefills under its own token budget and samples the first
  token; then it keeps the prompt's KV blocks (a fork of the sequence, ``_hold``) until the
  transfer ends. No decode step ever runs there.
* Hand-offs leave in arrival order. Each waits for a decode instance with room for its blocks
  (free blocks, less those promised to transfers in flight), then takes its prefill instance's
  outgoing link: transfers from one instance are serialized, each lasting
  ``blocks x block bytes / link bandwidth``.
* At the end of the transfer the decode instance queues the request with its prompt KV computed
  (``Sequence.external_kv_tokens``): its scheduler admits it by allocating the blocks and
  computing only the first token's KV; decode batches never hold a prefill (only a recompute
  preemption would prefill there, and it is counted).
* The user gets the first token with the hand-off (streamed by the decode side, as vLLM's P/D
  proxy does): TTFT = queueing + prefill + wait for a decode slot + transfer.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from elasticserve.request import Sequence as Seq
from elasticserve.request import next_seq_id
from elasticserve.sim.gpu_specs import DeviceSpec, GpuSpec
from elasticserve.sim.runtime import ModelRuntime, ModelSpec, RequestRecord
from elasticserve.sim.simulator import SimConfig, Simulator
from elasticserve.workload.generators import RequestSpec


@dataclass(frozen=True, slots=True)
class PdLayout:
    """``prefill`` prefill and ``decode`` decode instances; ``prefill == 0``: ``decode``
    colocated instances. ``link_gbps``: each prefill instance's outgoing KV link, Gbit/s.
    ``gpu_share`` in (0, 1): a 1:1 pair on ONE GPU, the prefill instance getting that share of
    its FLOP/s, HBM bandwidth and memory (a static spatial split, as MPS), the decode instance
    the rest; the hand-off then moves page ownership: no bytes copied, each page unmapped and
    mapped again (2 x ``page_map_s`` per page)."""

    prefill: int = 1
    decode: int = 1
    link_gbps: float = 400.0
    gpu_share: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.prefill, int) or self.prefill < 0:
            raise ValueError(f"prefill must be an integer >= 0, got {self.prefill!r}")
        if not isinstance(self.decode, int) or self.decode < 1:
            raise ValueError(f"decode must be an integer >= 1, got {self.decode!r}")
        if not self.link_gbps > 0:
            raise ValueError(f"link_gbps must be > 0, got {self.link_gbps!r}")
        if self.gpu_share and not (0 < self.gpu_share < 1 and self.prefill == self.decode == 1):
            raise ValueError(f"gpu_share must be in (0, 1) with a 1:1 layout, got "
                             f"{self.gpu_share!r} for {self.prefill}:{self.decode}")

    @property
    def same_gpu(self) -> bool:
        return self.gpu_share > 0

    @property
    def colocated(self) -> bool:
        return self.prefill == 0

    @property
    def instances(self) -> int:
        return self.prefill + self.decode

    @property
    def label(self) -> str:
        if self.colocated:
            return f"colocated x{self.decode}"
        if self.same_gpu:
            return f"P/D 1:1 on one GPU ({self.gpu_share:.0%} prefill)"
        return f"P/D {self.prefill}:{self.decode} @ {self.link_gbps:g} Gbps"

    @property
    def gpus(self) -> int:
        """GPUs per ``SimConfig.num_gpus``: one per instance, or one for a shared pair."""
        return 1 if self.same_gpu else self.instances

    def transfer_s(self, nbytes: int) -> float:
        return nbytes * 8 / (self.link_gbps * 1e9)


def parse_pd(text: str) -> tuple[int, int]:
    """``"P:D"`` -> (P, D); ValueError naming ``--pd`` otherwise."""
    p, sep, d = text.partition(":")
    try:
        pair = (int(p), int(d)) if sep else None
    except ValueError:
        pair = None
    if pair is None or pair[0] < 0 or pair[1] < 1:
        raise ValueError(f"--pd wants P:D with P >= 0 and D >= 1, got {text!r}")
    return pair


@dataclass(slots=True)
class Handoff:
    """One request's KV on its way from a prefill to a decode instance."""

    record: RequestRecord
    src: int  # prefill instance index
    hold_id: int  # the sequence id that keeps the KV blocks on the prefill instance
    tokens: int  # prompt tokens whose KV moves
    blocks: int
    nbytes: int  # KV bytes handed over (blocks x block bytes)
    copied: int  # bytes that crossed a link: 0 when page ownership moved on one GPU
    ready: float  # the first token was sampled
    dst: int = -1
    start: float = 0.0
    end: float = 0.0


@dataclass(slots=True)
class PdResult:
    """Timings of one run, every hand-off and per-instance counters."""

    layout: PdLayout
    records: list[RequestRecord]
    end_time: float
    handoffs: list[Handoff] = field(default_factory=list)
    block_bytes: int = 0
    instance_stats: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def kv_bytes_moved(self) -> int:
        return sum(h.nbytes for h in self.handoffs)

    @property
    def kv_bytes_copied(self) -> int:
        return sum(h.copied for h in self.handoffs)


@dataclass(slots=True)
class _Instance:
    name: str
    role: str  # "prefill", "decode" or "colocated"
    sim: Simulator
    free_at: float = 0.0  # busy with a step until then
    link_free_at: float = 0.0  # prefill: its outgoing link is busy until then
    reserved: int = 0  # decode: blocks promised to transfers in flight
    inflight: int = 0  # decode: requests in flight to it

    @property
    def rt(self) -> ModelRuntime:
        return self.sim.models[0]

    @property
    def unfinished(self) -> int:
        s = self.rt.scheduler
        return len(s.waiting) + len(s.running) + len(s.swapped) + self.inflight


class PdSimulator:
    """Runs one model under a :class:`PdLayout`; every instance has its own GPU(s)."""

    def __init__(self, spec: ModelSpec, config: SimConfig, layout: PdLayout) -> None:
        self.config, self.layout = config, layout
        roles = ["colocated"] if layout.colocated else ["prefill"] * layout.prefill
        roles = roles * (layout.decode if layout.colocated else 1)
        roles += [] if layout.colocated else ["decode"] * layout.decode
        self.instances = []
        for i, role in enumerate(roles):
            name = f"{role}{i}"
            cfg = config
            if layout.same_gpu:
                share = layout.gpu_share if role == "prefill" else 1 - layout.gpu_share
                cfg = dataclasses.replace(config, device=gpu_share(config.device, share))
            sim = Simulator([dataclasses.replace(spec, name=name)], cfg, "static")
            self.instances.append(_Instance(name, role, sim))
        self.front = [x for x in self.instances if x.role != "decode"]
        self.decoders = [x for x in self.instances if x.role == "decode"]
        for k, inst in enumerate(self.front):
            if inst.role == "prefill":
                inst.rt.hand_off = self._hand_off_fn(k)
        self.block_bytes = self.instances[0].rt.block_bytes
        self.pending: deque[Handoff] = deque()  # sampled, waiting for a decode slot
        self.inflight: list[Handoff] = []
        self.done: list[Handoff] = []
        self.now = 0.0

    def _hand_off_fn(self, k: int) -> Callable[[Seq, RequestRecord, float], None]:
        inst = self.front[k]

        def hand_off(seq: Seq, rec: RequestRecord, end: float) -> None:
            kv = inst.rt.scheduler.kv
            hold = next_seq_id()
            kv.fork(seq.seq_id, hold)  # the blocks outlive the sequence until sent
            blocks = len(kv.block_table(hold))
            nbytes = blocks * self.block_bytes
            copied = 0 if self.layout.same_gpu else nbytes
            self.pending.append(Handoff(rec, k, hold, seq.prompt_len, blocks, nbytes, copied,
                                        end))
        return hand_off

    # ---- the event loop -------------------------------------------------------------------
    def run(self, requests: Sequence[RequestSpec]) -> PdResult:
        """Simulate ``requests`` (sorted by arrival) to completion."""
        records = [RequestRecord(i, r.model, r.arrival, r.input_len, r.output_len)
                   for i, r in enumerate(requests)]
        i, n = 0, len(requests)
        while True:
            now = self.now
            while i < n and requests[i].arrival <= now:
                target = min(self.front, key=lambda x: x.unfinished)
                target.sim.now = now
                target.rt.add(requests[i], records[i])
                i += 1
            self._deliver(now)
            self._start_transfers(now)
            self._step_all(now)
            nxt = self._next_time(now, requests[i].arrival if i < n else None)
            if nxt is None:
                if i < n or self.pending or any(x.rt.has_work for x in self.instances):
                    raise RuntimeError(f"{self.layout.label}: stalled at t={now:.2f}")
                break
            self.now = max(now, nxt)
        return self._finish(records)

    def _step_all(self, now: float) -> None:
        for inst in self.instances:
            rt = inst.rt
            if inst.free_at > now or rt.blocked or not rt.has_work:
                continue
            inst.sim.now = now
            dt, _ = rt.step(now)
            inst.free_at = now + dt

    def _next_time(self, now: float, arrival: float | None) -> float | None:
        times = [x.free_at for x in self.instances
                 if x.free_at > now or (x.rt.has_work and not x.rt.blocked)]
        times += [h.end for h in self.inflight]
        times += [h.ready for h in self.pending if h.ready > now]
        if arrival is not None:
            times.append(arrival)
        return min(times) if times else None

    def _start_transfers(self, now: float) -> None:
        """Hand-offs whose first token is out, in order, each to the decode instance with the
        most room; the first that fits nowhere waits (and so does everything behind it)."""
        cap = self.config.max_num_seqs
        while self.pending and self.pending[0].ready <= now:
            h = self.pending[0]
            need = h.blocks + 1  # + the first decode token's slot
            room = [(x.rt.scheduler.kv.num_free_blocks - x.reserved, j)
                    for j, x in enumerate(self.decoders) if x.unfinished < cap]
            free, j = max(room, default=(-1, -1))
            if free < need:
                return
            self.pending.popleft()
            dst, src = self.decoders[j], self.front[h.src]
            dst.reserved += need
            dst.inflight += 1
            h.dst, h.start = j, max(now, src.link_free_at)
            h.end = src.link_free_at = h.start + self._transfer_s(h)
            self.inflight.append(h)

    def _transfer_s(self, h: Handoff) -> float:
        if not self.layout.same_gpu:
            return self.layout.transfer_s(h.copied)
        # page ownership: the pages holding the blocks leave one range and join the other
        pages = -(-h.nbytes // self.config.page_size)
        return 2 * pages * self.config.device.page_map_s

    def _deliver(self, now: float) -> None:
        """Transfers that ended: the decode instance queues the request with its KV, the
        prefill instance lets the blocks go."""
        arrived = [h for h in self.inflight if h.end <= now]
        if not arrived:
            return
        self.inflight = [h for h in self.inflight if h.end > now]
        for h in sorted(arrived, key=lambda h: (h.end, h.record.index)):
            dst, src = self.decoders[h.dst], self.front[h.src]
            dst.reserved -= h.blocks + 1
            dst.inflight -= 1
            rec = h.record
            rec.first_token = h.end  # the first token reaches the user with the hand-off
            dst.sim.now = now
            dst.rt.add(RequestSpec(rec.arrival, rec.model, rec.input_len, rec.output_len), rec,
                       kv_tokens=h.tokens)
            src.rt.scheduler.kv.free(h.hold_id)
            src.rt.blocked = False  # its memory came back
            self.done.append(h)

    def _finish(self, records: list[RequestRecord]) -> PdResult:
        result = PdResult(self.layout, records, self.now, self.done, self.block_bytes)
        for inst in self.instances:
            inst.rt.storage.check_integrity()
            inst.sim.arbiter.check_integrity()
            st = inst.rt.scheduler.stats
            result.instance_stats[inst.name] = {
                "steps": inst.rt.steps, "busy_s": inst.rt.busy_s,
                "preemptions": st.preemptions, "recomputes": st.recomputes,
                "blocks_used_at_end": inst.rt.scheduler.kv.pool.num_used}
        return result


def gpu_share(device: DeviceSpec, share: float) -> GpuSpec:
    """``share`` of one GPU: its FLOP/s, HBM bandwidth and memory scaled (a static split)."""
    if not isinstance(device, GpuSpec):
        raise ValueError(f"gpu_share needs a GPU device, got {device.name}")
    return device.replace(name=f"{device.name} x{share:.2f}", bf16_flops=device.bf16_flops * share,
                          hbm_bw=device.hbm_bw * share,
                          memory_bytes=int(device.memory_bytes * share))


def simulate_pd(spec: ModelSpec, requests: Sequence[RequestSpec], config: SimConfig,
                layout: PdLayout) -> PdResult:
    """A fresh :class:`PdSimulator` for ``layout`` run over ``requests``."""
    return PdSimulator(spec, config, layout).run(requests)
