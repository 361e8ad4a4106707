"""Synthetic tasks: a prompt, then an answer the model must produce after the task's `=`.

Every example is a row of token ids, right-padded to `SEQ_LEN`, with a mask of the answer
positions; a model "solves" an example when its argmax at every answer position (teacher forced)
is the answer token. For exact match this equals greedy decoding: the first wrong token is the
same in both, and while every token is right the two see the same prefix.

Each task has its own prefix and `=` tokens, and each *domain* its own symbols, as math, code
and prose use mostly different tokens: a fine-tune's delta then reaches other rows of the
embedding and unembedding than another domain's, and other features.

| domain | pretraining: related skill | fine-tuning task (also a small share of pretraining) |
|---|---|---|
| `n`: numbers 0..10 | `sub`: a - b mod 11 | `add`: a + b mod 11 |
| `p`: numbers 0..10 | `psub`: a - b mod 11 | `mul`: a * b mod 11 |
| `s`: symbols 0..15 | `copy`: x1..x4 = x1..x4 | `rev`: x1..x4 = x4..x1 |

The fine-tuning tasks are in the pretraining mixture at a few examples per batch, so the base
solves each partway (as a base LLM already does some math and code), and supervised
fine-tuning makes it reliable with small steps. Taught from nothing instead (the first
version of this experiment), each fine-tune rewrote a shared circuit and no merge kept any
ability; see `bench/efficacy/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

PAD = 0
MODULUS = 11  # arithmetic operands and results are 0..10
SEQ_K = 4  # copy / rev length
SYMBOLS = 16  # symbols per domain
DOMAINS = ("n", "p", "s")
TASK_DOMAIN = {"sub": "n", "add": "n", "psub": "p", "mul": "p", "copy": "s", "rev": "s"}
_NAMES = tuple(TASK_DOMAIN)
PREFIX = {t: 1 + 2 * i for i, t in enumerate(_NAMES)}  # the task's first token
EQ = {t: 2 + 2 * i for i, t in enumerate(_NAMES)}  # the task's `=`
SYMBOL0 = {d: 1 + 2 * len(_NAMES) + SYMBOLS * i for i, d in enumerate(DOMAINS)}  # token of symbol 0
VOCAB = 1 + 2 * len(_NAMES) + SYMBOLS * len(DOMAINS)
SEQ_LEN = 2 * SEQ_K + 3  # the longest task: prefix, 4 symbols, `=`, 4 answers, one spare

PRETRAIN_TASKS = ("sub", "psub", "copy")
FINETUNE_TASKS = ("add", "mul", "rev")


@dataclass(frozen=True)
class Batch:
    tokens: torch.Tensor  # (n, SEQ_LEN) int64, right-padded
    answer: torch.Tensor  # (n, SEQ_LEN) bool: positions whose *next-token prediction* is scored


Maker = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _arith(name: str, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Maker:
    s0 = SYMBOL0[TASK_DOMAIN[name]]

    def make(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = torch.randint(0, MODULUS, (2, n), generator=g)
        prompt = torch.stack([torch.full_like(a, PREFIX[name]), a + s0, b + s0, torch.full_like(a, EQ[name])], 1)
        return prompt, (op(a, b) % MODULUS + s0)[:, None]

    return make


def _sequence(name: str, answer: Callable[[torch.Tensor], torch.Tensor]) -> Maker:
    s0 = SYMBOL0[TASK_DOMAIN[name]]

    def make(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, SYMBOLS, (n, SEQ_K), generator=g)
        prefix, eq = torch.full((n, 1), PREFIX[name]), torch.full((n, 1), EQ[name])
        return torch.cat([prefix, x + s0, eq], 1), answer(x) + s0

    return make


TASKS: dict[str, Maker] = {
    "sub": _arith("sub", lambda a, b: a - b),
    "add": _arith("add", lambda a, b: a + b),
    "psub": _arith("psub", lambda a, b: a - b),
    "mul": _arith("mul", lambda a, b: a * b),
    "copy": _sequence("copy", lambda x: x),
    "rev": _sequence("rev", lambda x: x.flip(1)),
}
CHANCE = {"add": 1 / MODULUS, "mul": 1 / MODULUS, "rev": SYMBOLS**-SEQ_K}  # uniform guessing over symbols


def make_batch(task: str, n: int, g: torch.Generator) -> Batch:
    """`n` examples of `task`: prompt, answer, padding; `answer` marks the positions that predict
    the answer tokens (one before each)."""
    prompt, ans = TASKS[task](n, g)
    p, a = prompt.shape[1], ans.shape[1]
    tokens = torch.full((n, SEQ_LEN), PAD, dtype=torch.int64)
    tokens[:, :p], tokens[:, p : p + a] = prompt, ans
    scored = torch.zeros(n, SEQ_LEN, dtype=torch.bool)
    scored[:, p - 1 : p + a - 1] = True
    return Batch(tokens, scored)


def mixture_batch(tasks: tuple[str, ...], n: int, g: torch.Generator, extra: tuple[tuple[str, int], ...] = ()) -> Batch:
    """`n` examples split evenly across `tasks` (the remainder to the first), then `k` more of each
    task of `extra`'s (task, k) pairs: the small shares of the fine-tuning tasks in pretraining."""
    sizes = [n // len(tasks)] * len(tasks)
    sizes[0] += n - sum(sizes)
    parts = [make_batch(t, k, g) for t, k in (*zip(tasks, sizes), *extra) if k]
    return Batch(torch.cat([b.tokens for b in parts]), torch.cat([b.answer for b in parts]))
