"""Suite-wide settings: offline Hugging Face, one torch thread.

Tiny models on a shared 2-core machine: with torch's default thread pool every small op pays
tens of milliseconds of OpenMP contention; one thread is faster and more stable.
"""

import contextlib
import gc
import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import torch

    torch.set_num_threads(1)
    if not torch.cuda.is_available():
        # Triton kernels run in Triton's interpreter here. Set before anything (transformers'
        # generate does) imports triton: @triton.jit, triton's own library included, reads it
        # when a function is defined.
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # the torch-free core tests still run
    pass


@pytest.fixture
def steady_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """The rest of the process, frozen, for thresholds measured process-wide (RssShmem, the
    number of memory mappings). Engines of earlier tests are collected (their pages go now, not
    mid-test); every engine still alive (session fixtures) has its KV lock held, so its idle
    reclaimer and the multi-model idle sleeper cannot map or unmap pages during the test; and
    the map count of everything but the host backends is frozen (allocators of other threads
    map and unmap at any time, which moves a limit set as "current count + N"). Yields that
    count plus the host backends' own mappings."""
    from elasticserve.engine.llm_engine import LLMEngine
    from elasticserve.memory import linux

    gc.collect()
    with contextlib.ExitStack() as held:
        for obj in gc.get_objects():
            if issubclass(type(obj), LLMEngine):  # type(): isinstance wakes lazy modules
                held.enter_context(obj.kv.lock)
        others = linux.count_process_maps() - linux._tracked[0]
        monkeypatch.setattr(linux, "count_process_maps", lambda: linux._tracked[0] + others)
        yield others + linux._tracked[0]


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")])])
def device(request: pytest.FixtureRequest) -> str:
    """Every device the engine runs on here: "cpu" always, "cuda" where torch sees a GPU (the
    same test through the same code, GPU-marked)."""
    return str(request.param)
