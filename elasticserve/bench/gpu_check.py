"""The prepared device check (`make gpu-check`): one run, one results file, a few minutes.

    python -m elasticserve.bench.gpu_check --device cuda [--out gpu_check.json] [--write-docs]
    python -m elasticserve.bench.gpu_check --device cpu   # the same script, tiny sizes (CI)

Sections: the device and driver; CUDA VMM costs per 2 MiB page (create, map, set-access, unmap)
against kvcached's A100 figures; the Triton paged-attention kernel against the torch backend
(fp32, and bf16 on a GPU); offline throughput of the engine against transformers on the device,
the engine's greedy parity with transformers, and the HBM bandwidth it achieved against the
roofline; engine modes (bf16 greedy parity against fp32 within a tolerance, elastic vs static
KV overhead, with and without CUDA graphs: gpu_check_modes.py). Each section that fails is
recorded with its error and the others still run; the exit status is 1 if any failed. With
``--device cpu`` every piece runs on the CPU (host memory backend, Triton's interpreter), so
the script itself is tested in CI.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (see kernels/triton_attention)
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from elasticserve.bench import gpu_check_modes  # noqa: E402
from elasticserve.bench import gpu_check_parts as parts  # noqa: E402
from elasticserve.bench.report import Workload, make_workload  # noqa: E402

SECTION = "gpu-check"
# per device: requests, prompt lengths, output lengths, VMM pages, attention seqs and context
SIZES: dict[str, dict[str, Any]] = {
    "cpu": dict(model="tiny", requests=4, prompts=(8, 24), outputs=(4, 8), pages=8,
                attn_seqs=3, attn_context=40, dtypes=["float32"], hf_batch=4, parity=2,
                kv_bytes=32 << 20),
    "cuda": dict(model="small", requests=256, prompts=(32, 512), outputs=(16, 256), pages=256,
                 attn_seqs=64, attn_context=2048, dtypes=["float32", "bfloat16"], hf_batch=32,
                 parity=16, kv_bytes=8 << 30),
}


def throughput(device: str, model_dir: str, wl: Workload, hf_batch: int,
               parity: int) -> dict[str, Any]:
    """Engine (all requests in one generate) vs transformers (static batches) on ``device``,
    greedy parity on the first ``parity`` requests (transformers one at a time, unpadded)."""
    from elasticserve.bench import offline

    res: dict[str, Any] = {"requests": len(wl.prompts), "output_tokens": sum(wl.output_lens)}
    model = _hf_model(model_dir, device)
    start = time.perf_counter()
    for i in range(0, len(wl.prompts), hf_batch):
        _hf_generate(model, wl.prompts[i:i + hf_batch], max(wl.output_lens[i:i + hf_batch]), device)
    res["transformers_tok_s"] = round(sum(wl.output_lens) / (time.perf_counter() - start), 1)
    backend = "triton" if device == "cuda" else "auto"
    try:
        run = offline.engine_run(model_dir, wl, device=device, attention_backend=backend)
    except ValueError as err:  # no device plumbing in the engine yet (issue 15, item 1)
        res["engine"] = f"skipped: {err}"
        return res
    res.update(engine_tok_s=round(run.tokens_per_s, 1), attention_backend=backend,
               engine_gb_s=round(run.extra["bytes"] / run.seconds / 1e9, 3))
    res["speedup"] = round(res["engine_tok_s"] / res["transformers_tok_s"], 2)
    want = [_hf_generate(model, [p], n, device)[0] for p, n in
            zip(wl.prompts[:parity], wl.output_lens[:parity], strict=True)]
    res["greedy_parity"] = f"{sum(a == b for a, b in zip(want, run.outputs, strict=False))}/{parity}"
    res["roofline_pct"] = _roofline_pct(device, res["engine_gb_s"])
    return res


def _hf_model(model_dir: str, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.to(device).eval()


def _hf_generate(model: Any, prompts: list[list[int]], new: int, device: str) -> list[list[int]]:
    """One left-padded greedy generate of exactly ``new`` tokens per row."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    with torch.inference_mode():
        out = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    return [row[:new] for row in out[:, width:].tolist()]


def _roofline_pct(device: str, gb_s: float) -> float | None:
    if device != "cuda":
        return None
    from elasticserve.sim.gpu_specs import GPU_SPECS

    name = torch.cuda.get_device_name(0)
    for key, spec in GPU_SPECS.items():
        if key.split("-")[0] in name:
            return round(100 * gb_s * 1e9 / spec.hbm_bw, 2)
    return None


def run_check(device: str, model_dir: str | None = None) -> dict[str, Any]:
    """Every section on ``device`` ("cuda" or "cpu"); a failed section holds its error."""
    size = SIZES[device]
    results: dict[str, Any] = {}
    sections: dict[str, Callable[[], dict[str, Any]]] = {
        "device": lambda: parts.device_info(device),
        "vmm": lambda: parts.vmm_costs(device, size["pages"]),
        "attention": lambda: parts.triton_vs_torch(device, size["attn_seqs"], size["attn_context"],
                                                   size["dtypes"]),
        "throughput": lambda: _throughput(device, size, model_dir),
        "modes": lambda: _with_model(size, model_dir, lambda path, wl: gpu_check_modes.modes(
            device, path, wl, size["kv_bytes"])),
    }
    for name, fn in sections.items():
        start = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as exc:  # a device check reports every section it can
            results[name] = {"error": f"{type(exc).__name__}: {exc}",
                             "trace": traceback.format_exc(limit=4)}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
    return results


def _throughput(device: str, size: dict[str, Any], model_dir: str | None) -> dict[str, Any]:
    return _with_model(size, model_dir, lambda path, wl: throughput(
        device, path, wl, size["hf_batch"], size["parity"]))


def _with_model(size: dict[str, Any], model_dir: str | None,
                fn: Callable[[str, Workload], dict[str, Any]]) -> dict[str, Any]:
    """``fn(model dir, workload)`` over ``model_dir`` or a fresh random llama of the size."""
    from elasticserve.models.make_model import make_model

    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir or make_model("llama", size["model"], os.path.join(tmp, "model"), seed=0)
        wl = make_workload(size["requests"], 512, seed=0, prompt_lens=size["prompts"],
                           output_lens=size["outputs"])
        return fn(path, wl)


def markdown(results: dict[str, Any]) -> str:
    """The results as a BENCHMARKS.md section."""
    dev = results["device"]
    lines = [f"### Device check ({dev.get('device')}: {dev.get('name', '?')})", "",
             "```", json.dumps(dev), "```", ""]
    vmm = results["vmm"]
    if "median_us" in vmm:
        lines += [f"VMM per 2 MiB page, median us ({vmm['backend']}, {vmm['pages']} pages):", "",
                  "| call | ours | kvcached A100 |", "|---|---|---|"]
        lines += [f"| {k} | {v} | {vmm['kvcached_a100_us'][k]} |" for k, v in vmm["median_us"].items()]
        lines.append("")
    for name in ("attention", "throughput", "modes"):
        lines += [f"{name}:", "", "```", json.dumps(results[name], indent=1)[:2000], "```", ""]
    return "\n".join(lines)


def update_docs(body: str, path: Path | str | None = None) -> None:
    """Write the results into the gpu-check section of docs/BENCHMARKS.md (or ``path``)."""
    from elasticserve.docs_section import update_section

    update_section(SECTION, body, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="elasticserve bench gpu-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda: the real check; cpu: every piece on the CPU, tiny sizes (CI)")
    p.add_argument("--model", default=None, help="checkpoint dir (default: a random llama)")
    p.add_argument("--out", default="gpu_check.json", help="results file (JSON with markdown)")
    p.add_argument("--write-docs", action="store_true", help="also update docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    results = run_check(args.device, args.model)
    results["markdown"] = markdown(results)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    print(results["markdown"])
    if args.write_docs:
        update_docs(results["markdown"])
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    for name in failed:
        print(f"section {name} FAILED:\n{results[name]['trace']}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
