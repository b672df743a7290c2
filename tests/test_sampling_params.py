import math
import subprocess
import sys

import pytest

from elasticserve.errors import InvalidFieldError
from elasticserve.sampling_params import SamplingParams, SamplingType


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": "16"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"n": 0}, "n"),
        ({"n": True}, "n"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"use_beam_search": True, "best_of": 2, "n": 3}, "beam_width"),
        ({"beam_width": 2, "n": 3}, "beam_width"),
        ({"beam_width": 2, "best_of": 3}, "beam_width"),
        ({"stop": 5}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"seed": "x"}, "seed"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"use_beam_search": 1}, "use_beam_search"),
        ({"length_penalty": math.inf}, "length_penalty"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict, field: str) -> None:
    # the field travels on the error itself (the server's `param`), not only in its message
    with pytest.raises(InvalidFieldError, match=f"^{field} ") as info:
        SamplingParams(**kwargs)
    assert info.value.param == field


def test_message_shows_the_bad_value() -> None:
    with pytest.raises(ValueError, match=r"temperature must be >= 0, got -1"):
        SamplingParams(temperature=-1)


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1, 1.0, 1.0, 0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs) == (16, 0, None, None)
    assert p.stop == [] and p.stop_token_ids == []
    assert p.skip_special_tokens and not p.ignore_eos and not p.use_beam_search
    assert p.sampling_type is SamplingType.RANDOM and not p.is_greedy


def test_stop_is_normalized_to_a_list() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop_strings == ["a", "b"]  # type: ignore[arg-type]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_ids == [3, 4]  # type: ignore[arg-type]


def test_best_of_defaults_to_n_and_may_exceed_it() -> None:
    assert SamplingParams(n=3).best_of == 3
    p = SamplingParams(n=2, best_of=5)
    assert p.actual_best_of == 5 and p.n == 2


def test_beam_width_is_an_alias_for_beam_search() -> None:
    p = SamplingParams(beam_width=4, n=2, temperature=0.0)
    assert p.use_beam_search and p.best_of == 4 and p.beam_width == 4
    assert p.sampling_type is SamplingType.BEAM
    q = SamplingParams(use_beam_search=True, best_of=3)
    assert q.beam_width == 3
    r = SamplingParams(use_beam_search=True, n=2)
    assert r.beam_width == r.best_of == 2


def test_beam_search_allows_positive_temperature() -> None:
    p = SamplingParams(beam_width=2, temperature=0.8)
    assert p.sampling_type is SamplingType.BEAM


def test_greedy_detection_and_filter_reset() -> None:
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=5, min_p=0.2)
    assert p.is_greedy and p.sampling_type is SamplingType.GREEDY
    assert (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)
    assert SamplingParams(temperature=5e-6).is_greedy
    assert not SamplingParams(temperature=1e-4).is_greedy
    # top_k == 1 is still reported by temperature only (the sampler handles it).
    assert SamplingParams(top_k=1).sampling_type is SamplingType.RANDOM


def test_seed_makes_random_seed_type() -> None:
    assert SamplingParams(seed=7).sampling_type is SamplingType.RANDOM_SEED


def test_top_k_minus_one_means_off() -> None:
    assert SamplingParams(top_k=-1).top_k == 0


def test_max_tokens_none_means_until_model_limit() -> None:
    p = SamplingParams(max_tokens=None, min_tokens=100)
    assert p.max_tokens is None and p.min_tokens == 100


def test_boundaries_are_accepted() -> None:
    SamplingParams(top_p=1.0, min_p=1.0, presence_penalty=-2.0, frequency_penalty=2.0,
                   logprobs=20, prompt_logprobs=0, min_tokens=16, max_tokens=16)


def test_clone_is_independent_and_equal() -> None:
    p = SamplingParams(n=2, best_of=3, stop=["x"], stop_token_ids=[1], seed=5, temperature=0.5)
    q = p.clone()
    assert q == p and q is not p
    q.stop_strings.append("y")
    q.stop_ids.append(2)
    assert p.stop == ["x"] and p.stop_token_ids == [1]
    beam = SamplingParams(beam_width=3).clone()
    assert beam.use_beam_search and beam.beam_width == 3


def test_module_does_not_import_torch() -> None:
    code = "import sys, elasticserve.sampling_params; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
