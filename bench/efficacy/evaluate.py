"""Accuracy: the fraction of a fixed, seeded evaluation set answered exactly."""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from bench.efficacy.tasks import Batch, make_batch

EVAL_SEED = 10_000  # far from every training seed


def eval_sets(tasks: tuple[str, ...], n: int) -> dict[str, Batch]:
    """`n` examples per task, the same for every model evaluated."""
    return {t: make_batch(t, n, torch.Generator().manual_seed(EVAL_SEED + i)) for i, t in enumerate(tasks)}


@torch.no_grad()
def accuracy(model: LlamaForCausalLM, b: Batch) -> float:
    """Fraction of examples whose every answer token is the argmax (teacher forced = greedy here)."""
    pred = model(input_ids=b.tokens).logits.argmax(-1)  # (n, seq)
    right = (pred == b.tokens.roll(-1, dims=1)) | ~b.answer
    return right.all(dim=1).float().mean().item()


def accuracies(model: LlamaForCausalLM, sets: dict[str, Batch]) -> dict[str, float]:
    """Accuracy of `model` on every task of `sets`."""
    return {t: accuracy(model, b) for t, b in sets.items()}
