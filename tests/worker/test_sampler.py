import math

import pytest
import torch

from elasticserve.sampling_params import SamplingParams
from elasticserve.worker.sampler import (
    Sampler,
    SamplingRow,
    _thresholds,
    apply_penalties,
    prompt_logprobs,
)

# 4 degrees of freedom, p = 0.001: a correct sampler fails this about once in 1000 runs
# with fresh randomness; the tests seed torch, so they are deterministic.
CHI2_4DOF_999 = 18.47


def row(params: SamplingParams, *, prompt=(), output=(), generator=None, banned=(), beams=0):
    return SamplingRow(params, list(prompt), list(output), generator, frozenset(banned), beams)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


def draw(logits: torch.Tensor, params: SamplingParams, count: int, **kw) -> torch.Tensor:
    """Sample `count` times from one logits row in a single batched call."""
    rows = [row(params, **kw) for _ in range(count)]
    results = Sampler()(logits.expand(count, -1), rows)
    return torch.tensor([r.token_id for r in results])


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    observed = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    keep = expected > 0
    assert observed[~keep].sum() == 0, "sampled a token with zero probability"
    return float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_greedy_equals_argmax() -> None:
    logits = torch.randn(16, 1000)
    results = Sampler()(logits, [row(SamplingParams(temperature=0.0)) for _ in range(16)])
    assert [r.token_id for r in results] == logits.argmax(-1).tolist()
    assert all(math.isnan(r.logprob) and r.top_logprobs == [] for r in results)


def test_top_k_one_and_tiny_top_p_equal_greedy() -> None:
    logits = torch.randn(32, 500) * 3
    argmax = logits.argmax(-1).tolist()
    for params in (SamplingParams(top_k=1), SamplingParams(top_p=1e-6, temperature=1.3)):
        results = Sampler()(logits, [row(params) for _ in range(32)])
        assert [r.token_id for r in results] == argmax


def test_temperature_sampling_matches_softmax() -> None:
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    tokens = draw(logits, SamplingParams(temperature=0.7), 4000)
    assert chi_square(tokens, torch.softmax(logits / 0.7, -1)) < CHI2_4DOF_999


def test_top_k_renormalizes_over_the_k_best() -> None:
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    tokens = draw(logits, SamplingParams(top_k=3), 4000)
    expected = torch.softmax(logits.masked_fill(logits < 0.2, -math.inf), -1)
    assert chi_square(tokens, expected) < CHI2_4DOF_999


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # cumulative 0.4, 0.7, ...: p = 0.65 keeps tokens {0, 1}, renormalized to 4/7, 3/7.
    tokens = draw(logits, SamplingParams(top_p=0.65), 4000)
    assert chi_square(tokens, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0])) < CHI2_4DOF_999


def test_min_p_drops_tokens_below_fraction_of_max() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    # min_p = 0.4 keeps p >= 0.2: tokens {0, 1}.
    tokens = draw(logits, SamplingParams(min_p=0.4), 4000)
    assert chi_square(tokens, torch.tensor([0.625, 0.375, 0.0, 0.0])) < CHI2_4DOF_999


def reference_keep(x: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Sort-based top_k -> top_p -> min_p keep-mask for one row of scaled logits."""
    vals, ids = x.sort(descending=True)
    probs = torch.softmax(vals[:top_k] if top_k else vals, -1).double()
    n_keep = int(((probs.cumsum(0) - probs) < top_p).sum())
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[ids[:n_keep]] = True
    if min_p:
        keep &= x >= x.max() + math.log(min_p)
    return keep


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
def test_filters_match_sort_reference(scale: float) -> None:
    x = torch.randn(48, 5000) * scale
    x[0, :100] = -math.inf  # banned tokens must not disturb the histogram
    configs = [(0, 0.9, 0.0), (0, 0.3, 0.0), (0, 0.999, 0.0), (50, 0.8, 0.0), (7, 1.0, 0.0),
               (0, 1.0, 0.05), (20, 0.5, 0.1), (0, 1e-4, 0.0)]
    params = [SamplingParams(top_k=k, top_p=p, min_p=m) for k, p, m in configs] * 6
    row_max = x.amax(-1, keepdim=True)
    cut = _thresholds(x, row_max, (x - row_max).exp(), params)
    assert cut is not None
    for i, p in enumerate(params):
        expected = reference_keep(x[i], p.top_k, p.top_p, p.min_p)
        assert torch.equal(x[i] >= cut[i], expected), (i, p.top_k, p.top_p, p.min_p)


def test_sampled_tokens_stay_inside_nucleus_on_large_vocab() -> None:
    x = torch.randn(1, 32000) * 2
    tokens = draw(x[0], SamplingParams(top_p=0.5, temperature=1.0), 256)
    keep = reference_keep(x[0], 0, 0.5, 0.0)
    assert keep[tokens].all()
    assert tokens.unique().numel() > 20  # actually random, not collapsed to the argmax


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=7),
     SamplingParams(temperature=1.2, top_p=0.9, min_p=0.001, seed=7)],
)
def test_seed_reproducible_independent_of_batch(params: SamplingParams) -> None:
    target = torch.randn(6, 2000)  # one logits row per step
    others = [SamplingParams(temperature=0.5), SamplingParams(top_k=3), SamplingParams(),
              SamplingParams(temperature=0.0), SamplingParams(top_p=0.2, temperature=1.5)]

    def run(batch_noise: bool) -> list[int]:
        gen, tokens = seeded(7), []
        for step in range(6):
            rows = [row(params, generator=gen)]
            logits = target[step : step + 1]
            if batch_noise:
                rows = [row(p, generator=seeded(step)) for p in others[:3]] + rows
                rows += [row(p) for p in others[3:]] + [row(SamplingParams(beam_width=2), beams=2)]
                noise = torch.randn(len(rows), 2000)
                noise[3] = logits[0]
                logits = noise
            results = Sampler()(logits, rows)
            tokens.append(results[3 if batch_noise else 0].token_id)
        return tokens

    alone = run(False)
    assert alone == run(True)
    assert len(set(alone)) > 1
    other_seed = [Sampler()(target[s : s + 1], [row(params, generator=seeded(8))])[0].token_id
                  for s in range(6)]
    assert other_seed != alone


def test_penalties_match_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    original = logits.clone()
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    rows = [row(params, prompt=[0, 1], output=[3, 3, 2], banned=[4]), row(SamplingParams())]
    out = apply_penalties(logits, rows)
    # banned 4 -> -inf; repetition on {0,1,2,3}: 2/2, -1*2, 0.5/2, 3/2;
    # token 3 seen twice: -2*0.5 - 0.25; token 2 once: -0.5 - 0.25; token 5 untouched.
    expected = torch.tensor([1.0, -2.0, 0.25 - 0.75, 1.5 - 1.25, -math.inf, 1.0])
    assert torch.allclose(out[0], expected)
    assert torch.equal(out[1], original[1])
    assert torch.equal(logits, original)  # input untouched


def test_presence_and_frequency_ignore_prompt_tokens() -> None:
    logits = torch.zeros(1, 4)
    params = SamplingParams(presence_penalty=1.0, frequency_penalty=1.0)
    out = apply_penalties(logits, [row(params, prompt=[0, 0, 1], output=[1])])
    assert out[0].tolist() == [0.0, -2.0, 0.0, 0.0]
    assert apply_penalties(logits, [row(SamplingParams())]) is logits


def test_repetition_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert Sampler()(logits, [row(params, prompt=[0])])[0].token_id == 1
    assert Sampler()(logits, [row(params)])[0].token_id == 0


def test_banned_tokens_are_never_sampled() -> None:
    logits = torch.tensor([5.0, 1.0, 1.0, 0.5])
    tokens = draw(logits, SamplingParams(temperature=1.5), 2000, banned=[0, 2])
    assert set(tokens.tolist()) == {1, 3}
    greedy = Sampler()(logits[None], [row(SamplingParams(temperature=0.0), banned=[0])])
    assert greedy[0].token_id in (1, 2)


def test_logprobs_are_raw_model_log_softmax() -> None:
    logits = torch.randn(3, 300)
    rows = [row(SamplingParams(logprobs=5), banned=[0], output=[1, 1], prompt=[2]),
            row(SamplingParams(temperature=0.0, logprobs=0)),
            row(SamplingParams(temperature=0.0))]
    results = Sampler()(logits, rows)
    raw = logits.log_softmax(-1)
    for i in (0, 1):
        assert results[i].logprob == pytest.approx(raw[i, results[i].token_id].item(), abs=1e-6)
    vals, ids = raw[0].topk(5)
    assert [t for t, _ in results[0].top_logprobs] == ids.tolist()
    assert [lp for _, lp in results[0].top_logprobs] == pytest.approx(vals.tolist(), abs=1e-6)
    assert results[1].top_logprobs == []
    assert math.isnan(results[2].logprob)


def test_best_of_rows_get_a_logprob_for_ranking() -> None:
    logits = torch.randn(1, 50)
    result = Sampler()(logits, [row(SamplingParams(n=1, best_of=3))])[0]
    assert result.logprob == pytest.approx(logits.log_softmax(-1)[0, result.token_id].item())


def test_beam_candidates_sorted_and_after_penalties() -> None:
    logits = torch.randn(2, 100)
    top = int(logits[0].argmax())
    rows = [row(SamplingParams(beam_width=4), beams=4, banned=[top]),
            row(SamplingParams(temperature=0.0))]
    results = Sampler()(logits, rows)
    beam = results[0]
    assert beam.token_id == -1 and len(beam.top_logprobs) == 4
    banned = logits[0].clone()
    banned[top] = -math.inf
    vals, ids = banned.log_softmax(-1).topk(4)
    assert [t for t, _ in beam.top_logprobs] == ids.tolist()
    assert [lp for _, lp in beam.top_logprobs] == pytest.approx(vals.tolist(), abs=1e-6)
    assert results[1].token_id == int(logits[1].argmax())


def test_prompt_logprobs() -> None:
    logits = torch.randn(300, 40)  # more than one chunk
    targets = torch.randint(0, 40, (300,)).tolist()
    entries = prompt_logprobs(logits, targets, 3)
    raw = logits.log_softmax(-1)
    for i in (0, 150, 299):
        chosen, top = entries[i]
        assert chosen == pytest.approx(raw[i, targets[i]].item(), abs=1e-6)
        assert [t for t, _ in top] == raw[i].topk(3).indices.tolist()
    with pytest.raises(ValueError, match="next_token_ids"):
        prompt_logprobs(logits, targets[:-1], 3)


def test_rejects_mismatched_batch() -> None:
    with pytest.raises(ValueError, match="logits"):
        Sampler()(torch.zeros(2, 5), [row(SamplingParams())])
