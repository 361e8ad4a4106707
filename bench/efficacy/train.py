"""Pretraining and fine-tuning: AdamW on the answer tokens only (as SFT scores responses only).

Batches come from a generator seeded per run, so a run is a pure function of its settings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from bench.efficacy.tasks import Batch, mixture_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """How long and how hard one training run goes."""

    steps: int
    lr: float
    batch: int = 64
    warmup: int = 20
    weight_decay: float = 0.0


def answer_loss(model: LlamaForCausalLM, b: Batch) -> torch.Tensor:
    """Cross-entropy of the next-token prediction at the answer positions."""
    logits = model(input_ids=b.tokens).logits  # (n, seq, vocab)
    targets = b.tokens.roll(-1, dims=1)  # position t predicts token t + 1
    return F.cross_entropy(logits[b.answer], targets[b.answer])


def train(
    model: LlamaForCausalLM,
    tasks: tuple[str, ...],
    s: Schedule,
    seed: int,
    extra: tuple[tuple[str, int], ...] = (),
) -> dict[str, float]:
    """Train `model` in place on a mixture of `tasks` (plus `extra`'s few examples per batch of
    other tasks); linear warmup then cosine decay to 10%.

    Returns the first and last losses and the seconds taken.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.98))
    lr_at = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _lr_factor(i, s))
    model.train()
    t0, first, last = time.perf_counter(), float("nan"), float("nan")
    for step in range(s.steps):
        loss = answer_loss(model, mixture_batch(tasks, s.batch, g, extra))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_at.step()
        first = loss.item() if step == 0 else first
        last = 0.9 * last + 0.1 * loss.item() if step > 0 else loss.item()
        if step % 200 == 0:
            log.info("%s step %d loss %.3f", "+".join(tasks), step, loss.item())
    model.eval()
    return {"first_loss": first, "last_loss": last, "seconds": time.perf_counter() - t0}


def _lr_factor(i: int, s: Schedule) -> float:
    import math

    if i < s.warmup:
        return (i + 1) / s.warmup
    frac = (i - s.warmup) / max(1, s.steps - s.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
