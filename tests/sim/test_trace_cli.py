"""The trace scenario (``cli_sim trace --trace FILE``) and the unbounded-memory ceiling."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from elasticserve.sim import cli_sim
from elasticserve.sim.experiment import CEILING_MEMORY_FACTOR, compare, unbounded_memory
from elasticserve.sim.report import markdown, to_json
from elasticserve.sim.scenarios import get_scenario, trace_scenario
from elasticserve.workload.generators import RequestSpec
from elasticserve.workload.trace import TraceReplay
from tests.sim.test_experiment_cli import tiny


def write_trace(path: Path, n: int = 40, rate: float = 4.0) -> dict[str, int]:
    """A two-model JSONL trace; returns the request count per model."""
    rng = random.Random(0)
    counts = {"chat": 0, "code": 0}
    t = 0.0
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            t += rng.expovariate(rate)
            model = "chat" if i % 3 else "code"
            counts[model] += 1
            f.write(json.dumps({"timestamp": 100 + t, "model": model,
                                "input_len": rng.randint(50, 600),
                                "output_len": rng.randint(10, 80)}) + "\n")
    return counts


def test_trace_runs_end_to_end_through_the_cli(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "two.jsonl"
    counts = write_trace(path)
    out = tmp_path / "trace.json"
    assert cli_sim.main(["trace", "--trace", str(path), "--model-shape", "Qwen3-0.6B",
                         "--model-shape", "code=Qwen3-0.6B", "--policies", "static,arbiter",
                         "--bisect-iters", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "## trace: two.jsonl: 40 requests, 2 model(s) on 1x H100-80GB" in text
    assert "| static |" in text and "| arbiter |" in text and "| elastic |" not in text
    assert "models: code=Qwen3-0.6B, chat=Qwen3-0.6B" in text  # order of first row
    # the per-model table names both trace models with their request counts
    assert f"| chat | {counts['chat']} |" in text and f"| code | {counts['code']} |" in text
    doc = json.loads(out.read_text())
    assert set(doc["policies"]) == {"static", "arbiter"}
    assert all(p["requests"] == 40 for p in doc["policies"]["static"]["probes"])


def test_a_bad_trace_row_is_a_clean_error_naming_the_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.jsonl"
    write_trace(path, n=2)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"timestamp": 999, "model": "chat", "input_len": -3, "output_len": 5}\n')
    with pytest.raises(SystemExit) as err:
        cli_sim.main(["trace", "--trace", str(path)])
    assert err.value.code == 2
    assert f"{path}: line 3: input_len must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "problem"), [
    (["trace"], "needs --trace FILE"),
    (["ramp3", "--trace", "x.jsonl"], "trace scenario only"),
    (["ramp3", "--model-shape", "Qwen3-0.6B"], "trace scenario only"),
    (["trace", "--trace", "TRACE", "--model-shape", "nope=Qwen3-0.6B"], "not in the trace"),
    (["trace", "--trace", "TRACE", "--model-shape", "GPT-9"], "unknown model 'GPT-9'"),
    (["trace", "--trace", "TRACE", "--device", "TPU"], "unknown GPU 'TPU'"),
    (["trace", "--trace", "TRACE", "--num-gpus", "0"], "--num-gpus must be > 0"),
    (["trace", "--trace", "missing.jsonl"], "No such file"),
    # a setup error, not a traceback or a stalled run: a 70B model's weights exceed one H100
    (["trace", "--trace", "TRACE", "--model-shape", "code=Llama-3.1-70B", "--policies", "arbiter"],
     "code: weights (131.4 GiB) do not fit in the device budget"),
    (["trace", "--trace", "TRACE", "--model-shape", "Llama-3.1-70B", "--policies", "static"],
     "do not fit in the device budget"),
])
def test_argument_errors_exit_2(argv: list[str], problem: str, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.jsonl"
    write_trace(path, n=3)
    with pytest.raises(SystemExit) as err:
        cli_sim.main([str(path) if a == "TRACE" else a for a in argv])
    assert err.value.code == 2
    assert problem in capsys.readouterr().err


def test_trace_scenario_maps_shapes_device_and_rate(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_trace(path, n=10)
    scn = trace_scenario(path, {"chat": "Llama-3.1-8B"}, "Qwen3-0.6B", "H200", num_gpus=2)
    assert {m.name: m.shape.name for m in scn.models} == {"chat": "Llama-3.1-8B",
                                                          "code": "Qwen3-0.6B"}
    assert scn.config.device.name == "H200" and scn.config.num_gpus == 2
    reqs = scn.requests(seed=0)
    assert reqs[0].arrival == 0.0 and len(reqs) == 10  # rebased to the first row
    faster = scn.requests(seed=7, scale=2.0)  # the seed does not change a replay
    assert [r.arrival for r in faster] == pytest.approx([r.arrival / 2 for r in reqs])
    assert scn.rate_at(2.0) == pytest.approx(2 * 9 / reqs[-1].arrival)
    with pytest.raises(KeyError, match="built from a file"):
        get_scenario("trace")


def test_two_csv_traces_share_one_device_through_the_cli(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(3)
    for name, n in (("conv", 30), ("code", 12)):
        rows = [f"{i * 0.25:.2f},{rng.randint(50, 900)},{rng.randint(5, 90)}" for i in range(n)]
        (tmp_path / f"{name}.csv").write_text(
            "TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n", encoding="utf-8")
    assert cli_sim.main(["trace", "--trace", f"chat={tmp_path / 'conv.csv'}",
                         "--trace", f"coder={tmp_path / 'code.csv'}", "--model-shape",
                         "Qwen3-0.6B", "--policies", "static", "--bisect-iters", "1"]) == 0
    text = capsys.readouterr().out
    assert "## trace: conv.csv + code.csv: 42 requests, 2 model(s)" in text
    assert "| chat | 30 |" in text and "| coder | 12 |" in text


def test_replay_rate_of_a_single_instant() -> None:
    replay = TraceReplay((RequestSpec(0.0, "a", 1, 1), RequestSpec(0.0, "b", 1, 1)))
    assert replay.mean_rate == 2.0 and replay.models == ["a", "b"]


def test_memory_ceiling_bounds_every_policy() -> None:
    scn = tiny()
    scn.bisect_iters = 0  # brackets only: the ordering below holds at any precision
    big = unbounded_memory(scn)
    assert big.config.device.memory_bytes == CEILING_MEMORY_FACTOR * scn.config.device.memory_bytes
    assert scn.config.device.memory_bytes < big.config.device.memory_bytes  # original untouched
    comp = compare(scn, seed=0, policies=("static", "arbiter"), ceiling=True)
    top = comp.ceiling
    assert top is not None and top.at_max is not None
    assert top.max_rate >= comp.outcomes["arbiter"].max_rate >= comp.outcomes["static"].max_rate
    # KV never ran out: nobody was preempted at the ceiling's own max rate
    assert sum(s["preemptions"] for s in top.at_max.model_stats.values()) == 0
    assert "memory ceiling (arbiter, 100x memory" in markdown(comp)
    assert to_json(comp)["ceiling"]["max_rate"] == pytest.approx(top.max_rate)
