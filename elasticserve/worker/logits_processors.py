"""Logits processors of the sampler: banned tokens, repetition/presence/frequency penalties,
structured outputs' grammar masks. Index and value tensors are built on the host and copied to
the logits' device asynchronously (no host sync)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # the sampler imports this module
    from elasticserve.worker.sampler import SamplingRow


def _dev(t: Tensor, like: Tensor) -> Tensor:
    """A host-built tensor on ``like``'s device (asynchronous; a no-op on the CPU)."""
    return t.to(like.device, non_blocking=True)


def _needs_penalties(row: SamplingRow) -> bool:
    p = row.params
    rep = p.repetition_penalty != 1.0
    return bool(row.banned_token_ids) or rep or bool(p.presence_penalty or p.frequency_penalty)


def _pairs(row_ids: Sequence[int], token_lists: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """(row index, token id) tensors for per-row token lists.

    as_tensor per row converts in C (zero-copy for tensors), which matters for long prompts.
    """
    parts = [torch.as_tensor(t, dtype=torch.long).reshape(-1) for t in token_lists]
    lengths = torch.tensor([p.numel() for p in parts])
    tokens = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
    return torch.repeat_interleave(torch.tensor(row_ids, dtype=torch.long), lengths), tokens


def apply_penalties(logits: Tensor, rows: Sequence[SamplingRow]) -> Tensor:
    """Banned tokens, then repetition, then presence and frequency penalties.

    Returns ``logits`` itself when no row needs any, else a new tensor (the input
    is never modified). Updates touch only the (row, token) pairs that occur.
    """
    idx = [i for i, r in enumerate(rows) if _needs_penalties(r)]
    if not idx:
        return logits
    out = logits.clone()
    r, t = _pairs(idx, [sorted(rows[i].banned_token_ids) for i in idx])
    out.index_put_((_dev(r, out), _dev(t, out)), torch.tensor(-math.inf, device=out.device))
    rep = [i for i in idx if rows[i].params.repetition_penalty != 1.0]
    if rep:
        seen = [(rows[i].prompt_token_ids, rows[i].output_token_ids) for i in rep]
        r, t = _pairs([i for i in rep for _ in range(2)], [s for pair in seen for s in pair])
        penalty = _dev(torch.tensor([x.params.repetition_penalty for x in rows])[r], out)
        r, t = _dev(r, out), _dev(t, out)
        vals = out[r, t]
        # HF semantics: shrink toward zero, i.e. positive logits / rp, negative * rp.
        # Duplicate pairs read and write the same value, so no dedup is needed.
        out[r, t] = torch.where(vals > 0, vals / penalty, vals * penalty)
    occ = [i for i in idx if rows[i].params.presence_penalty or rows[i].params.frequency_penalty]
    if occ:
        r, t = _pairs(occ, [rows[i].output_token_ids for i in occ])
        freq = torch.tensor([x.params.frequency_penalty for x in rows])
        # accumulate=True subtracts the frequency penalty once per occurrence.
        out.index_put_((_dev(r, out), _dev(t, out)), _dev(-freq[r], out), accumulate=True)
        keys = torch.unique(r * out.shape[1] + t)  # on the host: no sync for its size
        r, t = keys // out.shape[1], keys % out.shape[1]
        pres = torch.tensor([x.params.presence_penalty for x in rows])
        out.index_put_((_dev(r, out), _dev(t, out)), _dev(-pres[r], out), accumulate=True)
    return out


def apply_allowed(logits: Tensor, processed: Tensor, rows: Sequence[SamplingRow]) -> Tensor:
    """Grammar masks: tokens a row's grammar forbids -> -inf. Rows without one cost nothing.

    A row left with no token (min_tokens banned the only one its grammar allows, EOS) follows
    its grammar alone: the grammar's structure wins over min_tokens. ``processed`` is written
    in place when it is already a copy of ``logits``.
    """
    idx = [i for i, r in enumerate(rows) if r.allowed is not None]
    if not idx:
        return processed
    out = logits.clone() if processed is logits else processed
    allowed = _dev(torch.stack([rows[i].allowed for i in idx]), out)  # type: ignore[misc]
    sub = out[idx].masked_fill_(~allowed, -math.inf)
    dead = torch.isneginf(sub).all(-1)
    if bool(dead.any()):
        sub[dead] = logits[idx][dead].masked_fill(~allowed[dead], -math.inf)
    out[idx] = sub
    return out


