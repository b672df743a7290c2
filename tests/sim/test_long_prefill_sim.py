"""The simulator passes long_prefill_token_threshold to the real scheduler: short requests
behind a long prompt get their first token within a second instead of after its prefill."""

from __future__ import annotations

import pytest

from elasticserve.sim.gpu_specs import H100_80GB
from elasticserve.sim.model_shapes import LLAMA_3_1_8B
from elasticserve.sim.runtime import ModelSpec
from elasticserve.sim.scenarios import get_scenario
from elasticserve.sim.simulator import SimConfig, Simulator
from elasticserve.workload.generators import RequestSpec
from tests.sim.sim_helpers import assert_clean

LONG = 48 * 1024


def short_ttfts(threshold: int) -> tuple[list[float], float]:
    """TTFT of eight short requests arriving just after a long one, and the long one's."""
    cfg = SimConfig(H100_80GB, max_num_batched_tokens=8192, max_model_len=LONG + 1024,
                    long_prefill_token_threshold=threshold)
    sim = Simulator([ModelSpec("m", LLAMA_3_1_8B)], cfg, "arbiter")
    assert sim.models[0].scheduler.config.long_prefill_token_threshold == threshold
    reqs = [RequestSpec(0.0, "m", LONG, 4)]
    reqs += [RequestSpec(0.05 * (i + 1), "m", 200, 16) for i in range(8)]
    res = sim.run(reqs)
    assert_clean(sim, res)
    ttfts = [r.ttft for r in res.records]
    assert all(t is not None for t in ttfts)
    return [t for t in ttfts[1:] if t is not None], ttfts[0] or 0.0


def test_capped_prefill_serves_short_requests_during_a_long_one() -> None:
    capped, long_capped = short_ttfts(2048)
    uncapped, long_uncapped = short_ttfts(0)
    assert max(capped) < 1.0  # admitted in the next step, sharing it with a 2048-token chunk
    assert min(uncapped) > 1.0 and max(uncapped) > 0.8 * long_uncapped  # waited for the prefill
    # the long prompt pays for sharing: more steps, each re-reading the weights
    assert long_uncapped < long_capped < 2 * long_uncapped


def test_longctx_caps_prefill_and_has_a_user_facing_slo() -> None:
    cfg = get_scenario("longctx").config
    assert cfg.long_prefill_token_threshold == 2048
    assert cfg.ttft_slo_s == 1.0 and cfg.ttft_slo_per_token_s == pytest.approx(1e-4)
