"""The device check end to end on the CPU (host backend, Triton's interpreter, tiny sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from elasticserve.bench import gpu_check


def test_gpu_check_runs_every_section_on_cpu(tmp_path: Path) -> None:
    out, docs = tmp_path / "check.json", tmp_path / "BENCHMARKS.md"
    assert gpu_check.main(["--device", "cpu", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["device"]["device"] == "cpu" and res["device"]["triton"]
    vmm = res["vmm"]["median_us"]
    assert vmm["create"] > 0 and vmm["map"] > 0 and vmm["unmap"] > 0
    assert vmm["set_access"] is None  # host mappings need no separate access call
    assert res["attention"]["float32"]["ok"] and res["attention"]["float32"]["max_abs_diff"] < 1e-4
    tp = res["throughput"]
    assert tp["greedy_parity"] == "2/2" and tp["engine_tok_s"] > 0 and tp["transformers_tok_s"] > 0
    assert tp["engine_gb_s"] > 0 and tp["roofline_pct"] is None
    modes = res["modes"]
    assert modes["bf16_vs_fp32"]["exact"].endswith("/4") and "ok" in modes["bf16_vs_fp32"]
    overhead = modes["elastic_vs_static"]
    assert overhead["same_tokens"] and overhead["static_tok_s"] > 0 and overhead["elastic_tok_s"] > 0
    assert modes["cuda_graphs"].startswith("skipped")
    assert "| create |" in res["markdown"] and "kvcached A100" in res["markdown"]
    gpu_check.update_docs(res["markdown"], docs)
    assert "<!-- bench:gpu-check -->" in docs.read_text()


def test_failed_section_is_reported_and_fails_the_run(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    def broken(device: str, pages: int) -> dict:
        raise RuntimeError("cuMemCreate failed: CUDA_ERROR_OUT_OF_MEMORY")

    monkeypatch.setattr(gpu_check.parts, "vmm_costs", broken)
    monkeypatch.setattr(gpu_check, "_throughput", lambda device, size, model_dir: {"skipped": 1})
    monkeypatch.setattr(gpu_check.gpu_check_modes, "modes", lambda *args: {"skipped": 1})
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--out", str(out)]) == 1
    res = json.loads(out.read_text())
    assert "CUDA_ERROR_OUT_OF_MEMORY" in res["vmm"]["error"]
    assert res["attention"]["float32"]["ok"]  # the other sections still ran
    assert "section vmm FAILED" in capsys.readouterr().out


def test_cuda_without_a_gpu_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--device", "cuda"])
    assert exc.value.code == 2


def test_cuda_vmm_timing_against_the_fake_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA branch of the VMM section, call discipline checked by the strict fake driver."""
    from elasticserve.memory import cuda as cuda_mod
    from tests.memory.fake_cuda_driver import FakeDriver

    fake = FakeDriver()
    monkeypatch.setattr(cuda_mod, "_drv", fake)
    cuda_mod.is_available.cache_clear()
    try:
        res = gpu_check.parts.vmm_costs("cuda", 4)
    finally:
        cuda_mod.is_available.cache_clear()
    assert all(v is not None and v > 0 for v in res["median_us"].values())
    assert fake.calls["cuMemCreate"] == 4 and fake.calls["cuMemUnmap"] == 4
    assert not fake.allocs and not fake.maps and not fake.ranges  # nothing leaked


def test_agreement_tolerance() -> None:
    from elasticserve.bench.gpu_check_modes import agreement

    same = agreement([[1, 2, 3, 4]] * 2, [[1, 2, 3, 4]] * 2)
    assert same == {"exact": "2/2", "first_token": 1.0, "mean_prefix": 1.0, "ok": True}
    late = agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 3, 9], [5, 6, 0, 0]])
    assert late["exact"] == "0/2" and late["mean_prefix"] == 0.625 and late["ok"]
    early = agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[9, 2, 3, 4], [5, 6, 7, 8]])
    assert early["first_token"] == 0.5 and not early["ok"]
    with pytest.raises(ValueError, match="outputs"):
        agreement([], [])
