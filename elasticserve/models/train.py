"""A short next-token training run on a checkpoint, so the demo model writes recognisable text.

Plain torch (AdamW, cross-entropy) on our own `CausalLM`: the training forward reuses its
layers (norms, RoPE, fused projections, gated MLP) with dense causal attention in place of the
paged cache, and the weights are saved back under the Hugging Face tensor names the loader
reads, so the result stays a standard checkpoint (transformers loads it too).

The recipe that made a checkpoint is written next to it (`training.json`): a caller that wants
a given recipe reuses a directory whose file matches and retrains when it does not.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import cast

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer

from elasticserve.models.layers import apply_rope
from elasticserve.models.llama import Attention, CausalLM, DecoderLayer
from elasticserve.models.loader import load_model
from elasticserve.models.make_model import DEFAULT_MODEL_DIR, make_model, stdlib_corpus
from elasticserve.models.progress import Progress

RECIPE_FILE = "training.json"
# bump when the training code changes what a recipe produces: cached checkpoints then retrain
RECIPE_VERSION = 1
_EVAL_BATCHES = 4


@dataclass(frozen=True, slots=True)
class TrainRecipe:
    """What a training run does; with the architecture and size it keys the cache."""

    # the demo size's 200 steps cost ~0.42 CPU-core-seconds each (~85 s on one core): about a
    # minute on two; held-out loss 6.96 -> 4.55 nats per token: Python-looking text when sampled
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 6e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    seed: int = 0
    # a cap, not the plan: a slower or busy machine stops early and keeps what it learned
    # (training.json records the steps reached), so a first start never hangs for minutes
    max_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class TrainResult:
    steps: int  # steps done (fewer than the recipe's when max_seconds stopped it)
    seconds: float
    tokens_seen: int
    eval_loss_before: float  # mean next-token cross-entropy on held-out text, nats
    eval_loss_after: float


DEMO_RECIPE = TrainRecipe()


def recipe_key(recipe: TrainRecipe, arch: str, size: str) -> dict:
    return {"version": RECIPE_VERSION, "arch": arch, "size": size, **asdict(recipe)}


def trained_with(model_dir: str, key: dict) -> bool:
    """Whether ``model_dir`` holds a finished checkpoint trained with recipe ``key``."""
    try:
        with open(os.path.join(model_dir, RECIPE_FILE), encoding="utf-8") as f:
            return bool(json.load(f).get("recipe") == key)
    except (OSError, ValueError, AttributeError):
        return False


def ensure_trained_model(path: str = DEFAULT_MODEL_DIR, arch: str = "llama",
                         size: str = "demo", recipe: TrainRecipe | None = None) -> str:
    """``path``, made and trained with ``recipe`` (default `DEMO_RECIPE`) unless it already
    holds a checkpoint trained with exactly that recipe (then it is reused as is)."""
    recipe = recipe or DEMO_RECIPE
    if not trained_with(path, recipe_key(recipe, arch, size)):
        make_trained_model(arch, size, path, recipe)
    return path


def make_trained_model(arch: str, size: str, out_dir: str, recipe: TrainRecipe) -> str:
    """`make_model` then `train_checkpoint` on the Python stdlib, built beside ``out_dir`` and
    moved in when done: an interrupted run never leaves a half-trained model in ``out_dir``."""
    out_dir = os.path.normpath(out_dir)
    parent, name = os.path.split(out_dir)
    tmp = os.path.join(parent, f".{name}.partial-{os.getpid()}")
    try:
        make_model(arch, size, tmp, seed=recipe.seed)
        label = (f"training the {size} {arch} model for {out_dir} "
                 f"(once, cached; at most {recipe.max_seconds:.0f} s)")
        train_checkpoint(tmp, recipe, stdlib_corpus(), recipe_key(recipe, arch, size), label)
        _move_into(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _move_into(src: str, out_dir: str) -> None:
    """Move a finished model's files into ``out_dir``, recipe file last: a run stopped half
    way leaves no recipe file, so the next `ensure_trained_model` retrains. Other files in
    ``out_dir`` are kept (it may be a user's directory), except old weights and their index,
    which the loader would otherwise read with the new ones."""
    os.makedirs(out_dir, exist_ok=True)
    stale = [RECIPE_FILE, *(f for f in os.listdir(out_dir)
                            if f.startswith("model") and ".safetensors" in f)]
    for name in stale:
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    for name in sorted(os.listdir(src), key=lambda f: f == RECIPE_FILE):
        os.replace(os.path.join(src, name), os.path.join(out_dir, name))


def train_checkpoint(model_dir: str, recipe: TrainRecipe, texts: Sequence[str], key: dict,
                     label: str = "training") -> TrainResult:
    """Train the checkpoint in ``model_dir`` (config, tokenizer, weights) on ``texts`` in
    place, then write ``training.json`` with ``key`` and the result. Progress goes to stderr."""
    gen = torch.Generator().manual_seed(recipe.seed)
    data = _token_stream(Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json")), texts)
    cut = int(len(data) * 0.95)
    train_data, eval_data = data[:cut], data[cut:]
    model = load_model(model_dir)
    _init_weights(model, gen)
    model.requires_grad_(True)
    with Progress(label) as progress:
        before = _eval_loss(model, eval_data, recipe)
        steps = _train_loop(model, train_data, recipe, gen, progress)
        after = _eval_loss(model, eval_data, recipe)
        progress.detail = (f"{steps} steps, held-out loss {before:.2f} -> {after:.2f}")
    result = TrainResult(steps, round(progress.elapsed_s, 2),
                         steps * recipe.batch_size * recipe.seq_len, before, after)
    _save_weights(model, model_dir)
    with open(os.path.join(model_dir, RECIPE_FILE), "w", encoding="utf-8") as f:
        json.dump({"recipe": key, "result": asdict(result)}, f, indent=2)
        f.write("\n")
    return result


def causal_lm_logits(model: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    """ids [B, T] -> logits [B, T, vocab]: the serving layers with dense causal attention."""
    inner = model.model
    h = inner.embed_tokens(ids)
    cos, sin = inner.rotary(torch.arange(ids.shape[1]), h.dtype)
    for module in inner.layers:
        layer = cast(DecoderLayer, module)  # ModuleList items are typed as Module
        h = h + _causal_attention(layer.self_attn, layer.input_layernorm(h), cos, sin)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.compute_logits(inner.norm(h))


def _causal_attention(attn: Attention, x: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
    b, t, _ = x.shape
    q, k, v = attn.qkv_proj(x).split([attn.hq * attn.d, attn.hkv * attn.d, attn.hkv * attn.d],
                                     dim=-1)
    q, k, v = (q.view(b, t, attn.hq, attn.d), k.view(b, t, attn.hkv, attn.d),
               v.view(b, t, attn.hkv, attn.d))
    if attn.q_norm is not None and attn.k_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    # cos/sin are [T, 1, D]: they broadcast over the batch and the heads
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, scale=attn.scale, enable_gqa=True)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, attn.hq * attn.d))


def _token_stream(tok: Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Every text's token ids, each followed by <|endoftext|> (id 0), as one long tensor."""
    ids: list[int] = []
    for enc in tok.encode_batch(list(texts)):
        ids += enc.ids
        ids.append(0)
    return torch.tensor(ids, dtype=torch.long)


def _init_weights(model: CausalLM, gen: torch.Generator) -> None:
    """GPT-2 style: N(0, 0.02), residual outputs scaled by 1/sqrt(2 layers), norms 1, biases
    0. (make_model's random init is tuned for parity tests, not for learning.)"""
    residual_std = 0.02 / math.sqrt(2 * model.config.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _batch(data: torch.Tensor, recipe: TrainRecipe,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - recipe.seq_len - 1, (recipe.batch_size,), generator=gen)
    rows = torch.stack([data[s : s + recipe.seq_len + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def _lr(recipe: TrainRecipe, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak at the last step."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    frac = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _train_loop(model: CausalLM, data: torch.Tensor, recipe: TrainRecipe, gen: torch.Generator,
                progress: Progress) -> int:
    """AdamW steps until the recipe's count or its time cap; returns the steps done."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": recipe.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.95))
    model.train()
    deadline = time.monotonic() + recipe.max_seconds
    step = 0
    while step < recipe.steps and time.monotonic() < deadline:
        for group in opt.param_groups:
            group["lr"] = _lr(recipe, step)
        x, y = _batch(data, recipe, gen)
        loss = F.cross_entropy(causal_lm_logits(model, x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        progress.update(f"step {step}/{recipe.steps}, loss {loss.item():.2f}")
    model.eval()
    return step


@torch.no_grad()
def _eval_loss(model: CausalLM, data: torch.Tensor, recipe: TrainRecipe) -> float:
    """Mean loss on fixed held-out windows (the same ones before and after training)."""
    gen = torch.Generator().manual_seed(1234)
    losses = [F.cross_entropy(causal_lm_logits(model, x).flatten(0, 1), y.flatten()).item()
              for x, y in (_batch(data, recipe, gen) for _ in range(_EVAL_BATCHES))]
    return sum(losses) / len(losses)


def _save_weights(model: CausalLM, model_dir: str) -> None:
    """Write the weights under their Hugging Face names (fused projections split back)."""
    params = dict(model.named_parameters())
    tensors = {name: params[slot.param][slot.start : slot.stop].detach().clone().contiguous()
               for name, slot in model.checkpoint_layout().items()}
    path = os.path.join(model_dir, "model.safetensors")
    save_file(tensors, f"{path}.tmp", metadata={"format": "pt"})
    os.replace(f"{path}.tmp", path)
