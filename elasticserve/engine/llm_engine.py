"""The step loop of one model: requests in, scheduler -> runner -> outputs out."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from elasticserve.core.block_pool import BlockPool
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.core.kv_pages import ModelBroker
from elasticserve.core.scheduler import Scheduler
from elasticserve.core.tiered_kv import TieredKVCacheManager, tier_stats
from elasticserve.engine.args import EngineArgs, model_max_len
from elasticserve.engine.beam_search import beam_step
from elasticserve.engine.host_tier import attach_stream, observe_stream, stream_max_blocks, stream_stats
from elasticserve.engine.kv_storage import KVStorage
from elasticserve.engine.output_processor import OutputProcessor
from elasticserve.engine.pd import KVHandOff, PDRole, role_stats
from elasticserve.engine.sleep_wake import SleepWake
from elasticserve.engine.step_stats import StepRecorder
from elasticserve.engine.validation import PromptInput, check_fits, tokenize_prompt
from elasticserve.engine.weights import DiskWeights, WeightsSource
from elasticserve.errors import InvalidFieldError
from elasticserve.kernels import native
from elasticserve.memory.backend import MemoryBackend
from elasticserve.models.hf_config import load_config
from elasticserve.models.llama import CausalLM
from elasticserve.models.tokenizer import Tokenizer
from elasticserve.outputs import ModelRunnerOutput, RequestOutput, SchedulerOutput
from elasticserve.request import Sequence, SequenceGroup, next_seq_id
from elasticserve.sampling_params import SamplingParams
from elasticserve.worker.cuda_graphs import decode_graphs
from elasticserve.worker.model_runner import ModelRunner
from elasticserve.worker.step_threads import StepThreads

logger = logging.getLogger(__name__)


class LLMEngine(SleepWake):
    """Owns one model, its tokenizer, its KV storage, a scheduler and a runner."""

    def __init__(self, args: EngineArgs, broker: ModelBroker | None = None,
                 weights: WeightsSource | None = None,
                 kv_backend: MemoryBackend | None = None) -> None:
        """`broker`: a shared page budget (engine/multi_model.py's ModelHost); it is told the
        weights' size before the KV storage asks it for pages. `weights`: where the model comes
        from at start and on wake (default: the checkpoint, a private copy). `kv_backend`: where
        the KV pages come from (default: `memory.backend`'s; a worker's: the broker's memfd)."""
        # validated before anything heavy is loaded; only the model's length limit is read
        self.config = args.create_engine_config(model_max_len(load_config(args.model)))
        self.cache_config = self.config.cache
        self.scheduler_config = self.config.scheduler
        self.broker = broker
        self.weights: WeightsSource = weights or DiskWeights()
        torch.manual_seed(self.config.model.seed)
        if self.config.model.num_threads is not None:
            torch.set_num_threads(self.config.model.num_threads)
        self.tokenizer = Tokenizer.from_dir(self.config.model.path)
        self.model = self._load_model()
        self.model_config = self.model.config
        if broker is not None:
            broker.attach_model(self.weights_bytes)
        self.kv = KVStorage(self.cache_config, self.config.memory, self.model_config,
                            self._param_dtype(), broker, kv_backend, device=self.config.device.device)
        self._build_scheduler_and_runner()
        self.outputs = OutputProcessor(self.tokenizer, self.scheduler_config.max_model_len)
        self.groups: dict[str, SequenceGroup] = {}
        self._next_id = 0
        # (start_pos, num_new) per scheduled sequence and the runner's seconds, per step, when
        # set to a list: what the simulator's CPU cost model is fitted to
        self.step_trace: list[tuple[tuple[tuple[int, int], ...], float]] | None = None
        self.step_stats = StepRecorder()  # each step's numbers for metrics (AsyncEngine pops)
        self.asleep, self.sleeps, self.wakes = False, 0, 0
        self.wake_latencies_s: list[float] = []
        self.last_active = time.monotonic()
        # prefill/decode disaggregation (engine/pd.py): set by a worker of either role; the
        # requests a prefill step handed over wait in `handoffs` for the worker to send them
        self.pd: PDRole | None = None
        self.handoffs: list[KVHandOff] = []
        self.kv.start_reclaimer()

    def _build_scheduler_and_runner(self) -> None:
        cache = self.cache_config
        pool = BlockPool(self.kv.num_blocks, enable_caching=cache.enable_prefix_caching)
        # with a host tier, prefix-cache blocks evicted from the device live on there
        tiered = cache.host_kv_cache_bytes is not None and cache.enable_prefix_caching
        self.kv_manager = (TieredKVCacheManager if tiered else KVCacheManager)(
            pool, cache.block_size, self.kv.num_swap_blocks, cache.enable_prefix_caching)
        self.kv.attach(pool, self.kv_manager)
        self.scheduler = Scheduler(self.scheduler_config, cache, self.kv_manager,
                                   grow=self.kv.grow if self.kv.elastic else None)
        self.kv.bind_scheduler(self.scheduler)
        backend = self.config.model.attention_backend
        self.runner = ModelRunner(
            self.model, self.kv.tensor, self.kv.swap_tensor, cache.block_size,
            self.tokenizer,
            native_decode=native.use_native(backend, self.kv.tensor, self._param_dtype()),
            triton_attention=backend == "triton", device=self.config.device.device,
            graphs=decode_graphs(self.config), layerwise_onload=cache.layerwise_onload,
            workspace=self._make_workspace())
        # the fused element-wise ops come with the native backend (same library, same checks)
        self.model.use_native_ops(self.runner.native_decode)
        attach_stream(cache, self.kv.host_tier, self.runner)  # layerwise_residency's stage
        small, threads = self.config.model.small_step_tokens, torch.get_num_threads()
        if small and threads > 1 and self.config.device.device == "cpu":
            self.runner.step_threads = StepThreads(threads, small)

    def _load_model(self) -> CausalLM:
        model = self.weights.load(self.config)
        # a source that shares host memory (procs/weights.py) gives CPU tensors: the device
        # gets its own copy
        return model.to(self.config.device.device)

    def _param_dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype

    @property
    def weights_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @classmethod
    def from_args(cls, model: str, **kwargs: Any) -> LLMEngine:
        return cls(EngineArgs(model=model, **kwargs))

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, prompt: PromptInput, params: SamplingParams,
                    request_id: str | None = None, priority: int = 0, stream: bool = False) -> str:
        """Validate and queue a request. Bad input raises ValueError and changes nothing.

        With `stream`, every step that adds tokens to the request returns a RequestOutput with
        `finished=False` and the text so far (the caller computes deltas)."""
        text, token_ids = self.validate(prompt, params)
        if request_id is None:
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        if request_id in self.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        group = SequenceGroup.create(request_id, text, token_ids, params, time.monotonic(),
                                     priority)
        group.stream = stream
        self.scheduler.add(group)  # admission control may refuse it (SLOUnattainableError)
        self.groups[request_id] = group
        return request_id

    def validate(self, prompt: PromptInput, params: SamplingParams) -> tuple[str | None, list[int]]:
        """Tokenize and check a request without queueing it; raises ValueError naming the field."""
        if not isinstance(params, SamplingParams):
            raise InvalidFieldError("sampling_params", "sampling_params must be SamplingParams, "
                                    f"got {type(params).__name__}")
        text, token_ids = tokenize_prompt(self.tokenizer, prompt, self.model_config.vocab_size)
        check_fits(token_ids, params, self.scheduler_config, self.cache_config.block_size,
                   stream_max_blocks(self.cache_config, self.kv.max_blocks, self.kv.host_tier))
        self.runner.check_structured(params)  # a bad grammar fails here, not in a step
        return text, token_ids

    def resize_kv_cache(self, nbytes: int) -> None:
        """Ask the KV storage for a new size now (elastic storage only)."""
        self.kv.resize(nbytes, self.scheduler)

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free every block it holds; unknown ids are ignored."""
        with self.kv.lock:  # the idle reclaimer may be compacting blocks
            group = self.scheduler.abort(request_id)
            if self.pd is not None:
                self.pd.forget(request_id)
        if group is not None:
            self.groups.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return outputs of the requests that finished in it.

        A failure caused by one request's data (its sampling, detokenizing, stop checks,
        logprobs) ends that request with FinishReason.ERROR and frees its blocks; the others
        carry on. Only a failure of the step itself (schedule, forward pass) raises."""
        if self.asleep and not self._wake_for_work():
            return self._failed_outputs()
        if self.scheduler.has_unfinished():
            self.last_active = time.monotonic()
        self.kv.before_step(self.scheduler)
        try:
            out, began = self.scheduler.schedule(), time.monotonic()
            if self.pd is not None:
                self.pd.before_execute(out)
            self.kv.add_onloads(out)
            start = time.perf_counter()
            result = self.runner.execute(out)
            if self.step_trace is not None and out.scheduled:
                chunks = tuple((s.start_pos, len(s.token_ids)) for s in out.scheduled)
                self.step_trace.append((chunks, time.perf_counter() - start))
            self.scheduler.on_step_done(out)
            for request_id, msg in result.failed.items():
                self.scheduler.abort(request_id, error=msg)
            self._process(out, result)
            streaming = self._streaming(out)
            finished = self.scheduler.pop_finished_groups() + self._failed_groups()
            handed = self.pd.hand_off(out) if self.pd is not None else []
        finally:
            self.kv.after_step(self.scheduler)
        now = time.monotonic()
        observe_stream(self.scheduler, self.runner, out, now - began)  # the TPOT guard's input
        self.step_stats.record(out, self.scheduler.stats, began, now)
        outputs = [self._output(g, now) for g in streaming if not g.is_finished]
        for handoff in handed:  # its stream continues on a decode worker
            self.groups.pop(handoff.request_id, None)
        self.handoffs += handed
        for group in finished:
            self.groups.pop(group.request_id, None)
            outputs.append(self._output(group, now))
        return outputs

    def _output(self, group: SequenceGroup, now: float) -> RequestOutput:
        try:
            return self.outputs.request_output(group, now)
        except Exception as exc:  # noqa: BLE001 - this request's output only
            self.groups.pop(group.request_id, None)  # final now: nothing more will be sent
            return self.outputs.error_output(group, self._fail(group, "building its output", exc),
                                             now)

    def _fail(self, group: SequenceGroup, what: str, exc: Exception) -> str:
        """End `group` after its own processing raised: FinishReason.ERROR, blocks freed."""
        logger.exception("request %s failed while %s", group.request_id, what)
        msg = f"{what} failed: {type(exc).__name__}: {exc}"
        if self.scheduler.abort(group.request_id, error=msg) is None:
            group.error = msg  # already out of the queues (finished this step)
        return msg

    def _streaming(self, out: SchedulerOutput) -> list[SequenceGroup]:
        """Streaming groups that sampled this step, their text brought up to date."""
        seen: dict[str, SequenceGroup] = {}
        for item in out.scheduled:
            group = self.groups.get(item.request_id)
            if group is None or not group.stream or not item.sample_seq_ids \
                    or group.is_finished or group.request_id in seen:
                continue
            seen[group.request_id] = group
            if group.is_beam_search:
                continue
            try:
                self.outputs.refresh_text(group)
            except Exception as exc:  # noqa: BLE001 - this request only
                self._fail(group, "detokenizing", exc)
        return list(seen.values())

    def _failed_outputs(self) -> list[RequestOutput]:
        """Final outputs of the groups failed outside a step (a wake that could not load)."""
        now = time.monotonic()
        failed = self._failed_groups()
        for group in failed:
            self.groups.pop(group.request_id, None)
        return [self._output(g, now) for g in failed]

    def _failed_groups(self) -> list[SequenceGroup]:
        """Groups the scheduler gave up on, in this step or in a resize between steps: it has
        dequeued them and set their error; they end like finished ones."""
        failed = (self.groups.get(f.request_id) for f in self.scheduler.pop_failed())
        return [g for g in failed if g is not None]

    def _process(self, out: SchedulerOutput, result: ModelRunnerOutput) -> None:
        now = time.monotonic()
        beam_groups: dict[str, SequenceGroup] = {}
        for item in out.scheduled:
            group = self.groups.get(item.request_id)
            if group is None or group.error is not None:
                continue  # gone, or failed earlier in this step
            try:
                if item.seq_id in result.prompt_logprobs:
                    group.add_prompt_logprobs(item.start_pos,
                                              result.prompt_logprobs[item.seq_id])
                if not item.sample_seq_ids:
                    continue
                if group.first_token_time is None:
                    group.first_token_time = now
                if group.is_beam_search:
                    beam_groups[group.request_id] = group
                    continue
                self._advance(group, item.seq_id, item.sample_seq_ids, result)
            except Exception as exc:  # noqa: BLE001 - one request's data fails that request
                self._fail(group, "processing its output", exc)
        for group in beam_groups.values():
            try:
                beam_step(group, result.samples, self.tokenizer.eos_token_ids,
                          lambda g, parent, index: self._fork(g, parent, index),
                          self.scheduler.finish_seq)
                for seq in group.seqs:
                    self.outputs.finalize_text(group, seq)
            except Exception as exc:  # noqa: BLE001 - one request's data fails that request
                self._fail(group, "a beam search step", exc)

    def _fork(self, group: SequenceGroup, parent: Sequence, index: int) -> Sequence:
        return self.scheduler.fork_seq(group, parent, next_seq_id(), index)

    def _advance(self, group: SequenceGroup, seq_id: int, sample_ids: list[int],
                 result: ModelRunnerOutput) -> None:
        parent = self.scheduler.seqs[seq_id]
        # children first: they must share the parent's blocks before it appends
        seqs = [parent] + [self.scheduler.fork_seq(group, parent, cid, i)
                           for i, cid in enumerate(sample_ids[1:], start=1)]
        for seq in seqs:
            self.outputs.append(group, seq, result.samples[seq.seq_id])
            status = self.outputs.check_stop(group, seq)
            if status is not None:
                self.outputs.finalize_text(group, seq)
                self.scheduler.finish_seq(seq, status)

    # ---- introspection --------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        s = self.scheduler.stats
        return {
            "steps": s.steps, "preemptions": s.preemptions, "swaps_out": s.swap_outs,
            "swaps_in": s.swap_ins, "recomputes": s.recomputes,
            "kv_offloaded_blocks": s.kv_offloaded_blocks, "kv_onloaded_blocks": s.kv_onloaded_blocks,
            "prefix_cache_hit_tokens": s.prefix_hit_tokens, **tier_stats(self.kv_manager),
            "blocks_used": self.kv_manager.pool.num_used,
            "blocks_total": self.kv_manager.pool.num_blocks,
            "num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
            "num_swapped": len(self.scheduler.swapped), **stream_stats(self.scheduler, self.runner),
            "asleep": self.asleep, "sleeps": self.sleeps, "wakes": self.wakes,
            **role_stats(self.pd),
        }

    def check_integrity(self) -> None:
        self.kv_manager.check_integrity()
        self.kv.check_integrity()

    def close(self) -> None:
        """Stop the KV storage's reclaimer thread and unmap its pages; the engine must not step
        afterwards. Without it the thread runs until garbage collection."""
        self.kv.close()
