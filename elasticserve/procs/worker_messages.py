"""What crosses a worker's data channel: requests in, one message per step out. Plain,
picklable dataclasses; exceptions cross as themselves (the request errors pickle whole)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from elasticserve.outputs import RequestOutput, StepStats
from elasticserve.sampling_params import SamplingParams

Role = Literal["colocated", "prefill", "decode"]


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """The first message a worker receives: who it is and how to build its engine."""

    worker: str  # unique name, e.g. "demo#0"
    model: str  # the served model name
    replica: int
    engine_args: Any  # engine.args.EngineArgs (kept Any: this module stays import-light)
    role: Role = "colocated"
    status_interval_s: float = 0.5  # an idle worker still reports its stats this often
    shared: bool = False  # pages and weights come from the front's broker (pages channel)
    priority: int = 0  # the model's priority and limits for the arbiter (shared only)
    min_bytes: int = 0
    max_bytes: int | None = None
    # P/D: the workers of one model share a KV group at the broker, so pages can change owner
    kv_group: str | None = None
    kv_handoff: str = "pages"  # "pages": lend whole pages where possible; "copy": always copy


# ---- front -> worker ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AddRequest:
    request_id: str
    prompt: Any  # str or {"prompt_token_ids": [...], "prompt": text}
    params: SamplingParams
    priority: int = 0
    stream: bool = False


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True, slots=True)
class AdoptRequest:
    """Decode worker: continue a request a prefill worker handed over (engine.pd.KVHandOff)."""

    handoff: Any


@dataclass(frozen=True, slots=True)
class ReleaseHandOff:
    """Prefill worker: the hand-off of `request_id` is over (received, or abandoned): free its
    blocks, taking back blanks for the pages the decode worker took."""

    request_id: str


@dataclass(frozen=True, slots=True)
class Call:
    """A request/reply operation on the worker (validate, sleep, wake, check_integrity)."""

    call_id: int
    op: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class Stop:
    """Finish the current step and exit."""


# ---- worker -> front ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ready:
    pid: int
    max_model_len: int
    config_info: dict[str, str]
    weights_bytes: int
    stats: dict[str, Any]
    memory_stats: dict[str, int]


@dataclass(frozen=True, slots=True)
class StepResult:
    """Everything one step produced: the only message per step (not per token)."""

    outputs: list[RequestOutput]
    step_stats: StepStats | None
    stats: dict[str, Any]
    memory_stats: dict[str, int]
    errors: list[tuple[str, BaseException]] = field(default_factory=list)  # failed adds
    handoffs: list[Any] = field(default_factory=list)  # prefill: engine.pd.KVHandOff each
    received: list[str] = field(default_factory=list)  # decode: requests whose KV arrived


@dataclass(frozen=True, slots=True)
class Status:
    """An idle worker's periodic stats (its memory may shrink without any step)."""

    stats: dict[str, Any]
    memory_stats: dict[str, int]


@dataclass(frozen=True, slots=True)
class Reply:
    call_id: int
    value: Any = None
    error: BaseException | None = None
