"""SchedulerOutput -> batch tensors -> forward -> sample -> ModelRunnerOutput."""

from __future__ import annotations

import logging
import time

import torch

from elasticserve.kernels.attention import AttentionMetadata, require_triton
from elasticserve.kernels.block_copy import copy_rows, index_tensors
from elasticserve.models.llama import CausalLM
from elasticserve.models.tokenizer import Tokenizer
from elasticserve.models.workspace import StepWorkspace, WorkspaceSource
from elasticserve.outputs import ModelRunnerOutput, SampleResult, ScheduledSeq, SchedulerOutput
from elasticserve.sampling_params import SamplingParams
from elasticserve.worker.cuda_graphs import DecodeGraphs
from elasticserve.worker.layer_onload import LayerOnload, LayerwiseCopier
from elasticserve.worker.layer_stream import LayerStream
from elasticserve.worker.sampler import Sampler, SamplingRow, prompt_logprobs
from elasticserve.worker.step_threads import StepThreads
from elasticserve.worker.structured import GrammarCompiler, GrammarStates, allowed_tokens

logger = logging.getLogger(__name__)
# torch.Generator.manual_seed takes [-2**63, 2**64); any Python int is reduced into it
_SEED_MODULUS = 2**64


class ModelRunner:
    """Runs one model over a paged KV cache tensor it does not own the memory of.

    `kv_cache` is `[max_blocks, layers, 2, block_size, kv_heads, head_dim]`: a plain tensor for a
    static cache, or a view over a reserved virtual range for an elastic one (its data_ptr never
    moves, so the runner never needs to be told when pages come and go).

    On a GPU (`device`) the batch's inputs are built on the host and copied over
    asynchronously, the sampler works on the device, and the sampled ids and logprobs come back
    together: one host sync per step. `graphs`: decode-only steps go through its static buffers
    (CUDA graphs on a GPU; see worker/cuda_graphs.py). `layerwise_onload`: a step's swap-in is
    copied layer by layer on a helper thread while the forward pass runs, each layer waiting
    only for its own copies (worker/layer_onload.py).
    """
    stream: LayerStream | None = None  # set by the engine: host-tier rows (layer_stream.py)

    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, swap_cache: torch.Tensor | None,
                 block_size: int, tokenizer: Tokenizer, native_decode: bool = False,
                 triton_attention: bool = False, device: torch.device | str = "cpu",
                 graphs: DecodeGraphs | None = None, layerwise_onload: bool = False,
                 workspace: WorkspaceSource | None = None) -> None:
        self.graphs = graphs  # before the model: setting the model resets captured graphs
        self.model = model
        self.kv_cache = kv_cache
        self.swap_cache = swap_cache
        self.device = torch.device(device)
        if graphs is not None and not triton_attention:
            raise ValueError("cuda_graphs needs attention_backend='triton'")
        self.block_size = block_size
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids)
        self.native_decode = native_decode  # decode attention by the C kernel (kernels/native.py)
        if triton_attention:
            require_triton()  # fail at start, naming attention_backend, not at the first step
        self.triton_attention = triton_attention  # all attention by kernels/triton_attention.py
        self.sampler = Sampler()
        self.layerwise = LayerwiseCopier() if layerwise_onload else None
        # seconds the step's thread spent on swap-in copies (blocking: copying; layer-wise:
        # waiting for a layer): what layer-wise onload takes off the step's path
        self.onload_stall_s = 0.0
        self.step_threads: StepThreads | None = None  # CPU: one thread for small steps
        # a step's MLP scratch and logits in budgeted pages (engine/workspace.py); None: torch's
        self.workspace = workspace
        self._generators: dict[int, torch.Generator] = {}
        # structured outputs: compiled grammars (shared with validation) and per-sequence matchers
        self.grammars = GrammarStates(GrammarCompiler(tokenizer, model.config.vocab_size))

    @property
    def model(self) -> CausalLM:
        return self._model

    @model.setter
    def model(self, model: CausalLM) -> None:
        """A new model (a wake reloads the weights at new addresses): graphs captured over the
        old one are dropped, to be captured again."""
        self._model = model
        if self.graphs is not None:
            self.graphs.reset()

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        onload = self.apply_block_ops(out)
        try:
            return self._execute(out, onload)
        finally:
            # the host tier may unmap the source rows after the step: the copier lets go first
            if onload is not None:
                assert self.layerwise is not None
                self.onload_stall_s += onload.stall_s
                self.layerwise.stolen_layers += onload.stolen
                if not onload.finish():
                    self.layerwise.abandon()

    def _execute(self, out: SchedulerOutput, onload: LayerOnload | None) -> ModelRunnerOutput:
        for seq_id in out.finished_seq_ids:
            self._generators.pop(seq_id, None)
        self.grammars.drop(out.finished_seq_ids)
        result = ModelRunnerOutput()
        if not out.scheduled:
            if onload is not None:
                onload.wait_all()
            return result
        tokens = sum(len(s.token_ids) for s in out.scheduled)
        if self.step_threads is not None:
            self.step_threads.apply(tokens)
        ws = None if self.workspace is None else self.workspace.begin(
            tokens, sum(1 for s in out.scheduled if s.sample_seq_ids))
        try:
            hidden, meta = self._forward(out.scheduled, onload, ws)
            if onload is not None:
                onload.wait_all()  # a copier error surfaces in this step, never later
            self._sample(out.scheduled, meta, hidden, result, ws)
        finally:
            if self.workspace is not None:
                self.workspace.end()  # nothing may read its pages after this
        self._prompt_logprobs(out.scheduled, meta, hidden, result)
        return result

    def apply_block_ops(self, out: SchedulerOutput) -> LayerOnload | None:
        """Swap out, swap in, then copy (COW and compaction), in that order. With layer-wise
        onload the swap-in is started, not done: the caller waits on the returned job (only
        when the step has no block copies, which might read the swapped-in blocks)."""
        if out.blocks_to_swap_out:  # host <-> device copies, in stream order
            assert self.swap_cache is not None, "swap-out scheduled without swap space"
            copy_rows(self.swap_cache, self.kv_cache, out.blocks_to_swap_out)
        if out.blocks_to_swap_in:
            assert self.swap_cache is not None, "swap-in scheduled without swap space"
            if self.layerwise is not None and not out.blocks_to_copy:
                return self.layerwise.start(self.kv_cache, self.swap_cache, out.blocks_to_swap_in)
            t0 = time.perf_counter()
            copy_rows(self.kv_cache, self.swap_cache, out.blocks_to_swap_in)
            self.onload_stall_s += time.perf_counter() - t0
        if out.blocks_to_copy:
            src, dst = index_tensors(out.blocks_to_copy, self.kv_cache.device)
            self.kv_cache[dst] = self.kv_cache[src]
        return None

    def _forward(self, scheduled: list[ScheduledSeq], onload: LayerOnload | None,
                 ws: StepWorkspace | None = None) -> tuple[torch.Tensor, AttentionMetadata]:
        """Hidden states of every new token: a decode-only batch that fits a bucket goes
        through the static buffers (graph replay on a GPU), anything else eagerly (layer i
        waiting for layer i's onload and stage, if any)."""
        bucket = None
        if self.graphs is not None and all(len(s.token_ids) == 1 for s in scheduled):
            bucket = self.graphs.bucket_for(len(scheduled))
        if bucket is None or self.graphs is None:
            input_ids, positions, meta = self._prepare(scheduled)
            wait = None if onload is None else onload.wait
            fwd = self.stream.wrap(self.model.forward, scheduled) if self.stream else self.model.forward
            return fwd(input_ids, positions, self.kv_cache, meta, wait, ws), meta
        if onload is not None:
            onload.wait_all()  # a replayed graph has no per-layer hook
        self.graphs.load([(s.token_ids[0], s.start_pos, s.block_table) for s in scheduled])
        return (self.graphs.run(self.model, self.kv_cache, bucket, len(scheduled)),
                self.graphs.meta(bucket))

    def _prepare(self, scheduled: list[ScheduledSeq]
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        tokens: list[int] = []
        positions: list[int] = []
        for item in scheduled:
            tokens.extend(item.token_ids)
            positions.extend(range(item.start_pos, item.start_pos + len(item.token_ids)))
        on_host = self.device.type == "cpu"
        meta = AttentionMetadata.build(
            [(s.start_pos, len(s.token_ids), s.block_table) for s in scheduled], self.block_size,
            device=None if on_host else self.device,
            native_decode=self.native_decode, triton=self.triton_attention)
        if meta.native_decode is not None and self.step_threads is not None:  # see NativeDecode
            meta.native_decode.threads = self.step_threads.max_threads
        return (self._to_device(tokens), self._to_device(positions), meta)  # one copy each

    def _to_device(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    def _sample(self, scheduled: list[ScheduledSeq], meta: AttentionMetadata,
                hidden: torch.Tensor, result: ModelRunnerOutput,
                ws: StepWorkspace | None = None) -> None:
        row_index: list[int] = []
        rows: list[SamplingRow] = []
        seq_ids: list[int] = []
        parents: list[int] = []
        owners: list[str] = []  # the request of each row
        for i, item in enumerate(scheduled):
            if not item.sample_seq_ids:
                continue
            try:  # a request's own data (its seed, its token lists) must not fail the batch
                item_rows = [self._row(item, sid, j) for j, sid in enumerate(item.sample_seq_ids)]
            except Exception as exc:  # noqa: BLE001 - reported as that request's failure
                _fail(result, item.request_id, "preparing its sampling", exc)
                continue
            last = meta.query_start_loc[i + 1] - 1
            row_index.extend([last] * len(item_rows))
            rows.extend(item_rows)
            seq_ids.extend(item.sample_seq_ids)
            owners.extend([item.request_id] * len(item_rows))
            parents.extend([item.seq_id] * len(item_rows))
        if not rows:
            return
        unique = sorted(set(row_index))
        logits = self.model.compute_logits(hidden[self._to_device(unique)], ws)
        if len(unique) != len(row_index):
            where = {r: k for k, r in enumerate(unique)}
            logits = logits[self._to_device([where[r] for r in row_index])]
        self._mask(rows, parents, seq_ids, logits.shape[1])
        try:
            samples: list[SampleResult | None] = list(self.sampler(logits, rows))
        except Exception:  # noqa: BLE001 - find the request(s) it came from
            samples = self._sample_each_request(logits, rows, owners, result)
        for row, sid, rid, sample in zip(rows, seq_ids, owners, samples, strict=True):
            if sample is None or rid in result.failed:
                continue
            result.samples[sid] = sample
            if row.allowed is not None:
                try:  # the request's own grammar
                    self.grammars.advance(sid, sample.token_id)
                except Exception as exc:  # noqa: BLE001 - reported as that request's failure
                    _fail(result, rid, "advancing its grammar", exc)

    def check_structured(self, params: SamplingParams) -> None:
        """Compile a request's structured-outputs constraint; raises InvalidFieldError."""
        if params.structured_outputs is not None:
            self.grammars.compiler.compile(params.structured_outputs)

    def _mask(self, rows: list[SamplingRow], parents: list[int], seq_ids: list[int],
              vocab: int) -> None:
        """Give every constrained row its grammar's mask; children's matchers are copied from
        the parent's before anyone advances."""
        idx = [i for i, r in enumerate(rows) if r.params.structured_outputs is not None]
        if not idx:
            return
        matchers = [self.grammars.for_row(seq_ids[i], parents[i],
                                          rows[i].params.structured_outputs)  # type: ignore[arg-type]
                    for i in idx]
        masks = allowed_tokens(matchers, self.grammars.compiler.lltokenizer.vocab_size, vocab)
        for k, i in enumerate(idx):
            rows[i].allowed = masks[k]

    def _sample_each_request(self, logits: torch.Tensor, rows: list[SamplingRow],
                             owners: list[str], result: ModelRunnerOutput
                             ) -> list[SampleResult | None]:
        """The batch failed: sample each request's rows alone, so that only the requests whose
        rows fail are failed (None for their rows). Only on this error path."""
        samples: list[SampleResult | None] = [None] * len(rows)
        by_request: dict[str, list[int]] = {}
        for k, rid in enumerate(owners):
            by_request.setdefault(rid, []).append(k)
        for rid, idx in by_request.items():
            try:
                for k, sample in zip(idx, self.sampler(logits[idx], [rows[k] for k in idx]),
                                     strict=True):
                    samples[k] = sample
            except Exception as exc:  # noqa: BLE001 - reported as that request's failure
                _fail(result, rid, "sampling", exc)
        return samples

    def _row(self, item: ScheduledSeq, seq_id: int, fork_index: int) -> SamplingRow:
        params = item.params
        prompt: list[int] = []
        outputs: list[int] = []
        if fork_index == 0 and _has_penalties(params):
            # slices only when penalties need them: O(length) per row otherwise wasted
            prompt = item.all_token_ids[:item.prompt_len]
            outputs = item.all_token_ids[item.prompt_len:]
        elif params.repetition_penalty != 1.0:
            prompt = item.all_token_ids[:item.prompt_len]
        num_out = len(item.all_token_ids) - item.prompt_len if fork_index == 0 else 0
        banned: frozenset[int] = frozenset()
        if num_out < params.min_tokens:
            banned = frozenset(params.stop_token_ids or ()) | (
                frozenset() if params.ignore_eos else self.eos_token_ids)
        return SamplingRow(
            params=params, prompt_token_ids=prompt, output_token_ids=outputs,
            generator=self._generator(seq_id, params.seed, fork_index),
            banned_token_ids=banned, num_candidates=item.num_candidates)

    def generator_state(self, seq_id: int) -> bytes | None:
        """A seeded sequence's RNG state (it moves with the sequence to another engine)."""
        gen = self._generators.get(seq_id)
        return None if gen is None else gen.get_state().numpy().tobytes()

    def set_generator_state(self, seq_id: int, state: bytes) -> None:
        gen = torch.Generator()
        gen.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
        self._generators[seq_id] = gen

    def _generator(self, seq_id: int, seed: int | None, fork_index: int) -> torch.Generator | None:
        if seed is None:
            return None
        gen = self._generators.get(seq_id)
        if gen is None:
            # children of one request draw from distinct, reproducible streams; any int is a
            # valid seed (as in vLLM's SamplingParams), so reduce it into the generator's range
            gen = torch.Generator().manual_seed((seed + 1_000_003 * fork_index) % _SEED_MODULUS)
            self._generators[seq_id] = gen
        return gen

    def _prompt_logprobs(self, scheduled: list[ScheduledSeq], meta: AttentionMetadata,
                         hidden: torch.Tensor, result: ModelRunnerOutput) -> None:
        for i, item in enumerate(scheduled):
            if item.prompt_logprobs is None or item.request_id in result.failed:
                continue
            try:
                entries = self._prompt_logprobs_of(item, meta.query_start_loc[i], hidden)
            except Exception as exc:  # noqa: BLE001 - reported as that request's failure
                _fail(result, item.request_id, "computing prompt logprobs", exc)
                continue
            result.prompt_logprobs[item.seq_id] = entries

    def _prompt_logprobs_of(self, item: ScheduledSeq, start: int, hidden: torch.Tensor
                            ) -> list[dict[int, float]]:
        assert item.prompt_logprobs is not None
        prompt = item.all_token_ids[:item.prompt_len]
        # position p predicts prompt token p + 1
        last_pos = min(item.start_pos + len(item.token_ids), len(prompt) - 1)
        count = last_pos - item.start_pos
        if count <= 0:
            return []
        logits = self.model.compute_logits(hidden[start:start + count])
        targets = prompt[item.start_pos + 1: item.start_pos + 1 + count]
        entries = prompt_logprobs(logits, targets, item.prompt_logprobs)
        return [{**dict(top), tok: lp} for tok, (lp, top) in zip(targets, entries, strict=True)]


def _fail(result: ModelRunnerOutput, request_id: str, what: str, exc: Exception) -> None:
    logger.exception("request %s failed while %s", request_id, what)
    result.failed.setdefault(request_id, f"{what} failed: {type(exc).__name__}: {exc}")


def _has_penalties(params: SamplingParams) -> bool:
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)

