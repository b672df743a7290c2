"""A worker process for test_page_broker.py: one LLMEngine whose KV pages come from the page
broker in the test process. Not the product's worker (procs/worker_main.py): just enough
to drive an engine over a control channel.

argv: model_dir worker pages_fd reclaim_fd control_fd page_size kv_max_bytes
Control messages: ("generate", prompts, max_tokens) -> ("step", n) after every step, then
("done", token lists in prompt order); ("exit",) ends the process.
"""

from __future__ import annotations

import sys
import threading

import torch


def main(argv: list[str]) -> None:
    from elasticserve.engine.args import EngineArgs
    from elasticserve.engine.llm_engine import LLMEngine
    from elasticserve.procs.page_client import RemotePageBroker, serve_reclaims
    from elasticserve.procs.transport import channel_from_fd
    from elasticserve.sampling_params import SamplingParams

    model, worker, pages_fd, reclaim_fd, control_fd, page, kv_max = argv
    torch.set_num_threads(1)
    pages, reclaim, control = (channel_from_fd(int(fd)) for fd in (pages_fd, reclaim_fd,
                                                                    control_fd))
    broker = RemotePageBroker(pages, worker, int(kv_max), int(page), weights_key="tiny")
    args = EngineArgs(model=model, kv_cache_mode="elastic", page_size=int(page),
                      kv_cache_max_bytes=int(kv_max), kv_shrink_after_s=60.0)
    engine = LLMEngine(args, broker=broker, kv_backend=broker.backend)
    broker.reclaimer.engine = engine
    threading.Thread(target=serve_reclaims, args=(reclaim, broker.reclaimer), daemon=True).start()
    control.send(("ready",))
    while True:
        msg, _ = control.recv()
        if msg[0] == "exit":  # type: ignore[index]
            return
        _, prompts, max_tokens = msg  # type: ignore[misc]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        ids = [engine.add_request({"prompt_token_ids": p}, params) for p in prompts]
        done: dict[str, list[int]] = {}
        steps = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = list(out.outputs[0].token_ids)
            steps += 1
            control.send(("step", steps))
        control.send(("done", [done[i] for i in ids]))


if __name__ == "__main__":
    main(sys.argv[1:])
