"""The seam between the HTTP server and the engines it serves.

The server talks to each model only through `EngineClient` and to the shared budget only
through `ModelPoolClient`. Today both are implemented in-process (`AsyncEngine` around an
`LLMEngine` on a step thread, and `ModelPool`); a client that drives an engine in a worker
process can implement the same Protocols, so nothing here may expose engine internals, and
everything that crosses it (prompts, SamplingParams, RequestOutput, dicts of numbers, the
errors below and `elasticserve.errors`) is plain data that pickles.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from elasticserve.outputs import RequestOutput, StepStats
from elasticserve.sampling_params import SamplingParams

# text, or {"prompt_token_ids": ids} with the text they came from under "prompt" (if any)
EnginePrompt = str | dict[str, Any]


class EngineOverloadedError(RuntimeError):
    """Too many requests are queued; the caller should retry later (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """The step loop stopped (shut down, or a step raised); no request can be served."""


class ModelLoadError(RuntimeError):
    """A sleeping model's weights could not be loaded again on wake. The model stays asleep
    with nothing charged to the budget, the requests waiting on it fail with this message,
    and the next request tries again. The message is safe to show a client (no file paths);
    the cause is logged on the server."""


@dataclass(slots=True)
class RequestTiming:
    """One request's life as an observer tracks it (times are time.monotonic()).

    `arrival` is when the server received the request (the caller's `arrival_time`), so TTFT
    and end-to-end latency include tokenizing and queueing; the engine client keeps the rest up
    to date through its observer's `on_step`."""

    arrival: float
    scheduled: float | None = None  # its first step began (the end of its queueing)
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: int = 0  # tokens generated so far, every sequence of the request


class OutputObserver(Protocol):
    """Gets every step's stats and every output on the engine's thread, e.g. to feed metrics.
    Both must be quick; an exception is logged and ignored."""

    def on_step(self, stats: StepStats, timings: Mapping[str, RequestTiming]) -> None:
        """After every step, before its outputs are delivered: `timings` holds the requests of
        `stats.new_tokens` that still have a consumer (aborted ones are missing); the observer
        updates them (first scheduled, first and last token, token count)."""
        ...

    def on_output(self, output: RequestOutput, timing: RequestTiming, now: float) -> None:
        """Every output delivered to a consumer; a finished one ends the request's metrics."""
        ...


class TokenizerLike(Protocol):
    """What the server does with a model's tokenizer: render chats, show tokens as text.

    `apply_chat_template(..., chat_template=TEXT)` renders TEXT instead of the model's own
    template (the server's --chat-template)."""

    @property
    def vocab_size(self) -> int:
        """Token ids are 0 .. vocab_size - 1."""
        ...

    @property
    def bos_token(self) -> str | None: ...

    @property
    def eos_token(self) -> str | None: ...

    @property
    def chat_template(self) -> str | None:
        """The model's own Jinja chat template, if it has one."""
        ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str: ...


@runtime_checkable
class EngineClient(Protocol):
    """One served model's engine, as the server sees it."""

    # gets every output (set by the server's metrics before the first request)
    observer: OutputObserver | None

    @property
    def name(self) -> str: ...

    @property
    def max_model_len(self) -> int:
        """Longest prompt + output, in tokens."""
        ...

    @property
    def tokenizer(self) -> TokenizerLike:
        """The model's tokenizer; only read from (safe on any thread)."""
        ...

    def start(self) -> None:
        """Start serving (idempotent)."""
        ...

    def health(self) -> str | None:
        """None while it can serve; otherwise why not (not started, shut down, crashed)."""
        ...

    def validate(self, prompt: EnginePrompt, params: SamplingParams
                 ) -> tuple[str | None, list[int]]:
        """Tokenize and check a request without queueing it: its text and token ids.

        Raises ValueError (an `elasticserve.errors.InvalidFieldError` naming the field,
        `PromptTooLargeError` when it can never fit). Blocking: call it off the event loop."""
        ...

    def generate(self, prompt: EnginePrompt, params: SamplingParams,
                 request_id: str | None = None, priority: int = 0,
                 stream: bool = False, arrival_time: float | None = None
                 ) -> AsyncIterator[RequestOutput]:
        """Submit now and return the request's outputs (with `stream`, progress as tokens come;
        always the final one last). Call on the event loop. `arrival_time` (time.monotonic())
        is when the server received the request; latency metrics count from it (default: now).

        Raises EngineOverloadedError / EngineDeadError right away; errors of the request
        itself come from the iterator. Closing the iterator early aborts the request."""
        ...

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; unknown or finished ids are ignored."""
        ...

    def stats(self) -> dict[str, Any]:
        """Scheduler counters: num_running, num_waiting, num_swapped, preemptions, sleeps,
        wakes, blocks_used, blocks_total (at least). May be one step old."""
        ...

    def memory_stats(self) -> dict[str, int]:
        """KV memory: kv_mapped_bytes, kv_used_bytes, grow_events, shrink_events,
        pages_granted, pages_reclaimed (at least). May be one step old."""
        ...

    def config_info(self) -> dict[str, str]:
        """Fixed cache settings as strings (block_size, kv_cache_mode, ...): the labels of the
        `cache_config_info` metric."""
        ...

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop serving; open streams get EngineDeadError."""
        ...


class ModelPoolClient(Protocol):
    """The models' shared memory budget, as the server's admin routes and router see it.

    Sleep and wake live here, not on EngineClient: the budget books the pages a sleeping model
    gives back, so a model must never be put to sleep behind its back."""

    @property
    def model_names(self) -> list[str]: ...

    def note_request(self, name: str) -> None:
        """A request for `name` arrived (popularity, for the reclaim order)."""
        ...

    def memory_report(self) -> dict[str, object]:
        """{"budget": {...}, "models": {name: {...}}}, JSON-ready."""
        ...

    def workers_report(self) -> list[dict[str, object]]:
        """Every engine process: worker, model, role, pid, state, device, kv_pages,
        weights_bytes, weights_shared, restarts (in-process engines: the server's pid)."""
        ...

    def set_limits(self, name: str, min_bytes: int | None, max_bytes: int | None,
                   priority: int | None) -> None:
        """Change a model's memory limits or priority (None keeps the current value).

        Raises InvalidFieldError naming the request field at fault."""
        ...

    def sleep(self, name: str) -> int:
        """Put a model to sleep now; returns the KV pages it gave back (ValueError if the
        budget cannot)."""
        ...

    def wake(self, name: str) -> bool:
        """Wake a model; False when the budget has no room now. Raises ModelLoadError when
        its weights cannot be loaded (it stays asleep)."""
        ...
