"""Layer-wise KV residency (LayerKV): sequences whose KV is in the host tier decode (or prefill a
chunk) anyway, each layer of their blocks staged onto the device just ahead of the layer that
reads it. A streamed prefill chunk stages the blocks of its context only (cached prefix + this
chunk; its table already holds host blocks for the whole prompt) and attends over the stage with
the torch prefill path (kernels/attention.py).

The stage holds ONE layer, double-buffered: `[2][stage_blocks, 1, 2, block_size, kv_heads,
head_dim]`. Layer j goes into buffer j % 2. A helper thread copies layers in order, but layer j
only once the forward pass has reached layer j - 1 (buffer j % 2 last held layer j - 2, whose
attention is then over); before layer i the step's thread copies any layer up to i that the
helper has not claimed (`steal`, as worker/layer_onload.py does), then waits for layer i.
Layer i's attention for the streamed rows runs over the stage (kernels/stage_attention.py),
which also writes the new token's K/V back to its host block; resident rows are untouched.
The stage is sized from the step's streamed blocks and grows on demand (never shrinks: a
later step reuses it); `stage_bytes` counts it. The copies are timed (wall seconds, both
threads' summed) for the scheduler's TPOT guard: `pop_cost` gives a step's seconds and blocks.

CPU only: on a GPU the stage copies would go on a copy stream with an event per layer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch

from elasticserve.kernels import native
from elasticserve.kernels.attention import AttentionMetadata
from elasticserve.kernels.block_copy import runs
from elasticserve.kernels.stage_attention import StagedDecode
from elasticserve.outputs import ScheduledSeq

__all__ = ["LayerStream", "StageFill", "StreamError"]

Forward = Callable[..., torch.Tensor]


class StreamError(RuntimeError):
    """A stage copy failed or missed its deadline: the step fails."""


class StageFill:
    """One step's stage copies: layer j by whoever claims it first, gated by the buffers."""

    def __init__(self, copy: Callable[[int], None], num_layers: int, deadline_s: float) -> None:
        self._copy = copy
        self._n = num_layers
        self._cond = threading.Condition()
        self._next = 0  # the lowest layer nobody has claimed
        self._allowed = 1  # layers up to this may be copied (two buffers: 0 and 1 at first)
        self._done = [False] * num_layers
        self._busy = False  # the helper is inside a copy
        self.cancelled = False
        self.error: BaseException | None = None
        self.stolen = 0  # layers the step's thread copied itself
        self._deadline = time.monotonic() + deadline_s

    def run_helper(self) -> None:
        """The helper thread: claim layers in order as the gate allows."""
        while True:
            with self._cond:
                while not self._over() and self._next > self._allowed:
                    if not self._cond.wait(max(0.0, self._deadline - time.monotonic())):
                        return  # the step's thread steals what is left
                if self._over():
                    return
                layer, self._busy = self._next, True
                self._next += 1
            self._run(layer, helper=True)

    def before_layer(self, layer: int) -> None:
        """Layer `layer - 1` is over: open the gate for `layer + 1`, copy unclaimed layers up
        to `layer` here, then wait for `layer`; raises StreamError."""
        with self._cond:
            self._allowed = layer + 1
            mine = list(range(self._next, layer + 1))
            self._next = max(self._next, layer + 1)
            self._cond.notify_all()
        for j in mine:
            self._run(j, helper=False)
            self.stolen += 1
        with self._cond:
            while not self._done[layer] and self.error is None:
                if not self._cond.wait(max(0.0, self._deadline - time.monotonic())):
                    raise StreamError(f"layer stream: layer {layer} missed its deadline")
        if self.error is not None:
            raise StreamError(f"layer stream failed: {self.error!r}") from self.error

    def finish(self) -> bool:
        """End of the step: nothing more is claimed; wait (at most a second past the deadline)
        for a copy the helper is in. False: the helper is stuck."""
        with self._cond:
            self.cancelled = True
            self._cond.notify_all()
            end = max(self._deadline, time.monotonic() + 1.0)
            while self._busy:
                if not self._cond.wait(max(0.0, end - time.monotonic())):
                    return False
        return True

    def _over(self) -> bool:
        return self.cancelled or self.error is not None or self._next >= self._n

    def _run(self, layer: int, helper: bool) -> None:
        try:
            with torch.inference_mode():
                self._copy(layer)
        except BaseException as exc:  # noqa: BLE001 - raised in the step by before_layer
            with self._cond:
                self.error = exc
                self._busy = self._busy and not helper
                self._cond.notify_all()
            return
        with self._cond:
            self._done[layer] = True
            self._busy = self._busy and not helper
            self._cond.notify_all()


class LayerStream:
    """The runner's side: per step, a `StagedDecode` for the streamed rows and the forward pass
    run with the stage filled layer by layer. `host` is the host tier's tensor."""

    def __init__(self, host: torch.Tensor, deadline_s: float = 30.0) -> None:
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s!r}")
        self.host = host
        self.deadline_s = deadline_s
        self._stage: torch.Tensor | None = None  # [2, stage_blocks, 1, 2, bs, kv_heads, dim]
        self._pool: ThreadPoolExecutor | None = None
        self.layer_bytes = 0  # bytes copied host -> stage, over all steps
        self.stolen_layers = 0  # stage layers the step's thread copied itself
        # since the last pop_cost: seconds spent in stage copies, host blocks staged per layer
        self._copy_s, self._blocks = 0.0, 0
        self._cost_lock = threading.Lock()  # the helper and the step's thread both add

    def pop_cost(self) -> tuple[float, int]:
        """(stage-copy seconds, streamed host blocks) since the last call (one step's, when
        called after each step); (0.0, 0) when nothing was streamed."""
        with self._cost_lock:
            cost, self._copy_s, self._blocks = (self._copy_s, self._blocks), 0.0, 0
        return cost

    @property
    def stage_bytes(self) -> int:
        """Bytes of the stage (both buffers) now allocated."""
        return 0 if self._stage is None else self._stage.numel() * self._stage.element_size()

    def wrap(self, forward: Forward, scheduled: list[ScheduledSeq]) -> Forward:
        """`forward` (CausalLM.forward's signature) made to stage the streamed rows' layers;
        `forward` itself when no row of the step is streamed."""
        idx = [i for i, s in enumerate(scheduled) if s.on_host]
        if not idx:
            return forward

        def run(input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, before_layer: Callable[[int], None] | None,
                workspace: object) -> torch.Tensor:
            staged, fill = self._begin(scheduled, idx, meta)
            stage = self._stage
            assert stage is not None

            def hook(layer: int) -> None:
                if before_layer is not None:
                    before_layer(layer)  # a layer-wise onload of the same step
                fill.before_layer(layer)
                staged.stage = stage[layer % 2]

            try:
                return forward(input_ids, positions, kv_cache, meta, hook, workspace)
            finally:
                self.stolen_layers += fill.stolen
                if not fill.finish() and self._pool is not None:
                    self._pool.shutdown(wait=False)  # a stuck helper: the next step gets another
                    self._pool = None
        return run

    def _begin(self, scheduled: list[ScheduledSeq], idx: list[int], meta: AttentionMetadata
               ) -> tuple[StagedDecode, StageFill]:
        rows: dict[int, int] = {}  # host block -> stage row
        bs = self.host.shape[3]
        for i in idx:
            for h in _context(scheduled[i], bs):
                rows.setdefault(h, len(rows))
        self._ensure(len(rows))
        staged = _staged(scheduled, idx, meta, rows, self.host)
        pairs = runs(list(rows.items()))
        per_layer = len(rows) * self.host[0, 0].numel() * self.host.element_size()
        stage, host = self._stage, self.host
        assert stage is not None

        def copy(layer: int) -> None:
            began = time.perf_counter()
            buf = stage[layer % 2]
            for s, d, n in pairs:
                buf[d:d + n, 0].copy_(host[s:s + n, layer])
            with self._cost_lock:
                self._copy_s += time.perf_counter() - began
                self.layer_bytes += per_layer

        with self._cost_lock:
            self._blocks += len(rows)

        fill = StageFill(copy, host.shape[1], self.deadline_s)
        if self._pool is None:  # lazily: an engine that never streams holds no thread
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kv-stage")
        self._pool.submit(fill.run_helper)
        return staged, fill

    def release(self) -> None:
        """Drop the stage (between steps, when no group is streamed): an elastic engine holds
        no staging memory it does not use. A helper abandoned mid-copy keeps its own reference,
        so it never writes into freed memory."""
        self._stage = None

    def _ensure(self, blocks: int) -> None:
        """A stage of at least `blocks` rows per buffer (grows by doubling; `release` frees it)."""
        have = 0 if self._stage is None else self._stage.shape[1]
        if blocks <= have:
            return
        rows = max(blocks, 2 * have)
        shape = (2, rows, 1, *self.host.shape[2:])
        self._stage = torch.empty(shape, dtype=self.host.dtype, device="cpu")


def _context(item: ScheduledSeq, block_size: int) -> list[int]:
    """The host blocks of a streamed row's context after this step (a streamed prefill holds
    blocks for its whole prompt; only those up to this chunk are staged)."""
    return item.block_table[:-(-(item.start_pos + len(item.token_ids)) // block_size)]


def _staged(scheduled: list[ScheduledSeq], idx: list[int], meta: AttentionMetadata,
            rows: dict[int, int], host: torch.Tensor) -> StagedDecode:
    """Take the streamed rows out of `meta`'s paged-cache work and describe them over the
    stage; sets `meta.staged`."""
    bs = host.shape[3]
    qsl, streamed = meta.query_start_loc, set(idx)
    resident = [t for i in range(len(scheduled)) if i not in streamed
                for t in range(qsl[i], qsl[i + 1])]
    res = torch.tensor(resident, dtype=torch.int64)
    meta.slot_mapping, meta.slot_blocks, meta.slot_offsets = (
        meta.slot_mapping[res], meta.slot_blocks[res], meta.slot_offsets[res])
    threads = meta.native_decode.threads if meta.native_decode is not None else 0
    dec = [i for i in range(len(scheduled)) if i not in streamed and qsl[i + 1] - qsl[i] == 1]
    meta.decode_tokens = torch.tensor([qsl[i] for i in dec], dtype=torch.int64)
    meta.native_decode = None
    if dec:
        meta.native_decode = native.NativeDecode.build(
            [qsl[i] for i in dec], [meta.seq_lens[i] for i in dec], meta.block_tables[dec])
        meta.native_decode.threads = threads
    starts = {qsl[i]: i for i in idx}  # streamed prefills leave the paged prefill list
    prefills = [replace(p, blocks=torch.tensor([rows[h] for h in _context(scheduled[starts[
        p.token_start]], bs)], dtype=torch.int64)) for p in meta.prefills if p.token_start in starts]
    meta.prefills = [p for p in meta.prefills if p.token_start not in starts]
    tokens = [(t, scheduled[i].block_table[(scheduled[i].start_pos + t - qsl[i]) // bs],
               (scheduled[i].start_pos + t - qsl[i]) % bs) for i in idx for t in range(qsl[i], qsl[i + 1])]
    meta.staged = StagedDecode(
        rows=torch.tensor([t for t, _, _ in tokens], dtype=torch.int64), resident_rows=res,
        stage_blocks=torch.tensor([rows[h] for _, h, _ in tokens], dtype=torch.int64),
        host_blocks=torch.tensor([h for _, h, _ in tokens], dtype=torch.int64),
        offsets=torch.tensor([o for _, _, o in tokens], dtype=torch.int64),
        work=_stage_decode([i for i in idx if qsl[i + 1] - qsl[i] == 1], scheduled, qsl, rows,
                           threads, bs),
        host=host, prefills=prefills)
    return meta.staged


def _stage_decode(dec: list[int], scheduled: list[ScheduledSeq], qsl: list[int],
                  rows: dict[int, int], threads: int, bs: int) -> native.NativeDecode | None:
    """The native decode of the streamed single-token rows, block tables in stage rows."""
    if not dec:
        return None
    ctx = [[rows[h] for h in _context(scheduled[i], bs)] for i in dec]
    width = max(len(c) for c in ctx)
    tables = torch.tensor([c + [0] * (width - len(c)) for c in ctx], dtype=torch.int64)
    work = native.NativeDecode.build([qsl[i] for i in dec],
                                     [scheduled[i].start_pos + 1 for i in dec], tables)
    work.threads = threads
    return work
