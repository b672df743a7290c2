"""The demo model's training: loss falls, the checkpoint loads with our loader and with
transformers (same greedy tokens), the recipe caches it, an interrupted run leaves nothing."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from elasticserve.cli import main
from elasticserve.models import train
from elasticserve.models.loader import load_model
from elasticserve.models.make_model import make_model
from elasticserve.models.progress import Progress
from elasticserve.models.tokenizer import Tokenizer
from elasticserve.models.train import (
    RECIPE_FILE,
    TrainRecipe,
    ensure_trained_model,
    make_trained_model,
    recipe_key,
    trained_with,
)

# a few seconds on the tiny size: enough steps for the held-out loss to fall clearly
QUICK = TrainRecipe(steps=60, batch_size=8, seq_len=64, lr=1e-2, warmup_steps=5, max_seconds=30)
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json")
PROMPTS = ("def ", "import os\n", "class Queue:\n    def __init__(self")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> str:
    return ensure_trained_model(str(tmp_path_factory.mktemp("trained") / "m"), "llama", "tiny",
                                QUICK)


def _result(path: str) -> dict:
    with open(os.path.join(path, RECIPE_FILE), encoding="utf-8") as f:
        return json.load(f)


def test_training_lowers_held_out_loss(trained: str) -> None:
    record = _result(trained)
    assert record["recipe"] == recipe_key(QUICK, "llama", "tiny")
    result = record["result"]
    assert result["steps"] == QUICK.steps  # not stopped by the time cap
    # untrained: ~ln(512) = 6.2 nats; 60 small steps reach about the unigram statistics
    assert result["eval_loss_before"] > 5.5
    assert result["eval_loss_after"] < result["eval_loss_before"] - 0.5


def test_trained_checkpoint_greedy_matches_transformers(trained: str,
                                                        greedy: Callable) -> None:
    tok = Tokenizer.from_dir(trained)
    prompts = [tok.encode(p) for p in PROMPTS]
    ours = greedy(load_model(trained), prompts, max_new=16, eos=tok.eos_token_ids).tokens
    hf = AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32).eval()
    for prompt, tokens in zip(prompts, ours, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                              do_sample=False)
        assert tokens == out[0, len(prompt):].tolist()


def test_cached_checkpoint_is_reused_and_a_new_recipe_retrains(
        trained: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained = str(shutil.copytree(trained, tmp_path / "m"))  # mtimes kept (copy2)
    calls: list[str] = []
    real = train.train_checkpoint

    def spy(model_dir: str, recipe: TrainRecipe, *args: object, **kw: object) -> object:
        calls.append(model_dir)
        return real(model_dir, recipe, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(train, "train_checkpoint", spy)
    weights = os.path.join(trained, "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    assert ensure_trained_model(trained, "llama", "tiny", QUICK) == trained
    assert calls == [] and os.stat(weights).st_mtime_ns == before
    changed = replace(QUICK, steps=3)
    assert ensure_trained_model(trained, "llama", "tiny", changed) == trained
    assert len(calls) == 1 and trained_with(trained, recipe_key(changed, "llama", "tiny"))
    assert not trained_with(trained, recipe_key(QUICK, "llama", "tiny"))
    assert load_model(trained).config.num_hidden_layers == 2


def test_interrupted_training_leaves_no_model(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_train_loop", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_trained_model(str(tmp_path / "m"), "llama", "tiny", QUICK)
    assert os.listdir(tmp_path) == []  # neither the model nor its partial build


def test_training_into_a_used_directory_keeps_other_files(tmp_path) -> None:
    out = tmp_path / "m"
    make_model("llama", "tiny", str(out), num_shards=2)  # old weights in two shards + index
    (out / "notes.txt").write_text("mine")
    make_trained_model("llama", "tiny", str(out), replace(QUICK, steps=2))
    assert sorted(os.listdir(out)) == sorted([*FILES, RECIPE_FILE, "notes.txt"])
    assert (out / "notes.txt").read_text() == "mine"
    assert load_model(str(out)).config.num_hidden_layers == 2


def test_make_model_cli_trains_for_the_seconds_given(tmp_path, capsys) -> None:
    out = str(tmp_path / "t")
    assert main(["make-model", "--size", "tiny", "--train-seconds", "1", "--out", out]) == 0
    record = _result(out)
    assert record["recipe"]["max_seconds"] == 1 and record["result"]["steps"] >= 1
    err = capsys.readouterr().err
    assert f"training the tiny llama model for {out}" in err and "done in" in err
    random = str(tmp_path / "r")
    assert main(["make-model", "--size", "demo", "--train-seconds", "0", "--out", random]) == 0
    assert not os.path.exists(os.path.join(random, RECIPE_FILE))
    assert load_model(random).config.vocab_size == 1024


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_on_a_terminal_and_writes_two_lines_elsewhere() -> None:
    log = io.StringIO()
    with Progress("training x", stream=log, interval_s=0) as p:
        p.update("step 1/2")
        p.detail = "2 steps"
    lines = log.getvalue().splitlines()  # no status redraws off a terminal
    assert len(lines) == 2 and lines[0] == "training x ..."
    assert lines[1].startswith("training x: done in ") and lines[1].endswith(" s (2 steps)")
    tty = _Tty()
    with pytest.raises(RuntimeError), Progress("loading", stream=tty, interval_s=0) as p:
        p.update("step 1/2")
        raise RuntimeError
    text = tty.getvalue()
    assert "\rloading: step 1/2 [0 s]\x1b[K" in text and "\rloading: failed after " in text
