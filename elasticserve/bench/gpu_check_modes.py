"""The device check's engine-mode section: bf16 greedy parity against fp32 (within a
tolerance), elastic vs static KV overhead, and decode with vs without CUDA graphs.

Every run is one `offline.engine_run` of the same workload on a fresh engine. On the CPU the
same code runs at tiny sizes; CUDA graphs are reported as skipped there (no capture on a CPU).
"""

from __future__ import annotations

from typing import Any

from elasticserve.bench.report import Workload

# bf16 vs fp32 greedy: rounding flips near-ties, after which a sequence diverges for good, so
# the tolerance is on where divergence starts: nearly every request agrees on its first token
# and, on average, on at least half of its tokens before the first difference
FIRST_TOKEN_MIN = 0.9
PREFIX_MIN = 0.5


def agreement(want: list[list[int]], got: list[list[int]]) -> dict[str, Any]:
    """Exact matches, first-token agreement and mean common-prefix fraction of ``got``."""
    if len(want) != len(got) or not want:
        raise ValueError(f"outputs: need as many non-empty runs, got {len(want)} and {len(got)}")
    prefixes = []
    for w, g in zip(want, got, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(w, g, strict=False)) if a != b),
                    min(len(w), len(g)))
        prefixes.append(same / max(1, len(w)))
    first = sum(bool(w) and bool(g) and w[0] == g[0] for w, g in zip(want, got, strict=True))
    first_share = round(first / len(want), 3)
    mean_prefix = round(sum(prefixes) / len(prefixes), 3)
    return {"exact": f"{sum(w == g for w, g in zip(want, got, strict=True))}/{len(want)}",
            "first_token": first_share, "mean_prefix": mean_prefix,
            "ok": first_share >= FIRST_TOKEN_MIN and mean_prefix >= PREFIX_MIN}


def modes(device: str, model_dir: str, wl: Workload, kv_bytes: int) -> dict[str, Any]:
    """bf16 parity, elastic vs static overhead, CUDA graphs vs eager, on ``device``."""
    from elasticserve.bench import offline

    kv = dict(device=device, kv_cache_bytes=kv_bytes, kv_cache_max_bytes=kv_bytes)
    dtype = "bfloat16" if device == "cuda" else "float32"  # what the device serves in

    def run(**kwargs: Any) -> Any:
        return offline.engine_run(model_dir, wl, **{**kv, "dtype": dtype, **kwargs})

    res: dict[str, Any] = {"dtype": dtype, "kv_bytes": kv_bytes}
    fp32, bf16 = run(dtype="float32"), run(dtype="bfloat16")
    res["bf16_vs_fp32"] = {**agreement(fp32.outputs, bf16.outputs),
                           "fp32_tok_s": _tok_s(fp32), "bf16_tok_s": _tok_s(bf16)}
    # static first, then a fresh elastic run: neither pays the process's first-run costs
    static, elastic = run(kv_cache_mode="static"), run()
    res["elastic_vs_static"] = {"elastic_tok_s": _tok_s(elastic), "static_tok_s": _tok_s(static),
                                "overhead_pct": _overhead(elastic, static),
                                "same_tokens": elastic.outputs == static.outputs}
    if device != "cuda":
        res["cuda_graphs"] = "skipped: no graph capture on the CPU (the static-buffer path is " \
                             "tested eagerly in tests/worker/test_cuda_graphs.py)"
        return res
    eager, graphs = run(attention_backend="triton"), run(cuda_graphs=True)
    res["cuda_graphs"] = {"eager_tok_s": _tok_s(eager), "graphs_tok_s": _tok_s(graphs),
                          "speedup": round(eager.seconds / graphs.seconds, 3),
                          "same_tokens": eager.outputs == graphs.outputs}
    return res


def _tok_s(run: Any) -> float:
    return round(run.tokens_per_s, 1)


def _overhead(elastic: Any, static: Any) -> float:
    """Extra wall time of the elastic run over the static one, in percent."""
    return round(100 * (elastic.seconds / static.seconds - 1), 2)
