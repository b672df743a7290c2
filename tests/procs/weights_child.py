"""Child-process side of the shared-weights tests (run as a script, never collected).

usage: weights_child.py serve SOCK_FD MODEL_DIR   an engine on SharedWeights: prints its greedy
                                                  tokens as one JSON line, waits for stdin EOF,
                                                  sleeps the engine (detach), exits
       weights_child.py write MEMFD NBYTES        maps the weights file read-only, reads it,
                                                  then writes through the view (must SIGSEGV)
"""

from __future__ import annotations

import json
import os
import sys

import torch

from elasticserve.engine.args import EngineArgs
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.memory.shared_weights import WeightsManifest, map_weights
from elasticserve.procs.transport import channel_from_fd
from elasticserve.procs.weights import SharedWeights
from elasticserve.sampling_params import SamplingParams

PROMPTS = [[5, 17, 42, 9], [300, 2, 77, 500, 3]]
ENGINE_ARGS = {"kv_cache_bytes": 1 << 20, "swap_space": 0, "num_threads": 1}


def greedy(engine: LLMEngine) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ids = [engine.add_request({"prompt_token_ids": p}, params) for p in PROMPTS]
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out.outputs[0].token_ids
    return [done[i] for i in ids]


def serve(sock_fd: int, model_dir: str) -> None:
    source = SharedWeights(channel_from_fd(sock_fd), wait_s=60)
    engine = LLMEngine(EngineArgs(model=model_dir, **ENGINE_ARGS), weights=source)  # type: ignore[arg-type]
    tokens = greedy(engine)
    print(json.dumps({"tokens": tokens, "loader": source.loaded_here,
                      "weights_bytes": engine.weights_bytes}), flush=True)
    sys.stdin.read()  # the parent measures us meanwhile
    engine.sleep()
    engine.close()
    print("SLEPT", flush=True)


def write(fd: int, nbytes: int) -> None:
    view = map_weights(fd, WeightsManifest((("x", 0, "float32", (nbytes // 4,)),), nbytes))["x"]
    os.close(fd)
    print("READ", float(view.sum()), flush=True)
    with torch.no_grad():
        view[0] = 1.0  # no PROT_WRITE: the kernel must kill us here
    print("WRITE_DID_NOT_FAULT", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3])
    else:
        write(int(sys.argv[2]), int(sys.argv[3]))
