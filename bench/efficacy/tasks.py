"""Synthetic tasks: a prompt, then an answer the model must produce after `=`.

Every example is a row of token ids, right-padded to `SEQ_LEN`, with a mask of the answer
positions; a model "solves" an example when its argmax at every answer position (teacher forced)
is the answer token. For exact match this equals greedy decoding: the first wrong token is the
same in both, and while every token is right the two see the same prefix.

Pretraining teaches *related* skills, never the fine-tuning tasks themselves, so the base scores
near chance on them and each fine-tune adds one ability, as SFT does in the DARE paper:

| pretraining | fine-tuning | the step between them |
|---|---|---|
| `sub`: a - b mod P | `add`: a + b mod P | reuse the number embeddings, new table |
| `copy`: x1..xk = x1..xk | `rev`: x1..xk = xk..x1 | attend to the mirrored position |
| `copy` | `inc`: x1..xk = x1+1..xk+1 mod S | a new map of every symbol |

`pair` (k1 v1 .. k4 v4 kj -> vj, induction) is one more general skill in the mixture. A
key-value task built on it (`k1 v1 .. k4 v4 ? kj = -> vj`) was tried as a fine-tune and left
out: with a small learning rate it stayed near a third after 200 steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

PAD, EQ = 0, 1  # token 2 is unused
PREFIX = {"copy": 3, "sub": 4, "pair": 5, "add": 6, "rev": 7, "inc": 8}
SYMBOL0 = 9  # token of symbol 0
SYMBOLS = 16  # symbols 0..15
MODULUS = 11  # add / sub operands and results are 0..10
SEQ_K = 4  # copy / rev length
PAIRS = 4  # key-value pairs in pair
VOCAB = SYMBOL0 + SYMBOLS
SEQ_LEN = max(2 * SEQ_K + 2, 2 * PAIRS + 3)  # the longest task: a sequence one, or pair

PRETRAIN_TASKS = ("copy", "sub", "pair")
FINETUNE_TASKS = ("add", "rev", "inc")


@dataclass(frozen=True)
class Batch:
    tokens: torch.Tensor  # (n, SEQ_LEN) int64, right-padded
    answer: torch.Tensor  # (n, SEQ_LEN) bool: positions whose *next-token prediction* is scored


def _sym(x: torch.Tensor) -> torch.Tensor:
    return x + SYMBOL0


def _distinct(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """(n, k) distinct symbols per row."""
    return torch.rand(n, SYMBOLS, generator=g).argsort(dim=1)[:, :k]


def _arith(name: str, sign: int) -> Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    def make(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = torch.randint(0, MODULUS, (2, n), generator=g)
        prompt = torch.stack([torch.full_like(a, PREFIX[name]), _sym(a), _sym(b), torch.full_like(a, EQ)], 1)
        return prompt, _sym((a + sign * b) % MODULUS)[:, None]

    return make


def _sequence(
    name: str, answer: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    def make(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, SYMBOLS, (n, SEQ_K), generator=g)
        prefix, eq = torch.full((n, 1), PREFIX[name]), torch.full((n, 1), EQ)
        return torch.cat([prefix, _sym(x), eq], 1), _sym(answer(x))

    return make


def _lookup(name: str) -> Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    def make(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        keys = _sym(_distinct(n, PAIRS, g))  # (n, PAIRS)
        values = _sym(torch.randint(0, SYMBOLS, (n, PAIRS), generator=g))
        j = torch.randint(0, PAIRS, (n, 1), generator=g)
        pairs = torch.stack([keys, values], 2).reshape(n, 2 * PAIRS)
        return torch.cat([torch.full((n, 1), PREFIX[name]), pairs, keys.gather(1, j)], 1), values.gather(1, j)

    return make


TASKS: dict[str, Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]] = {
    "copy": _sequence("copy", lambda x: x),
    "sub": _arith("sub", -1),
    "pair": _lookup("pair"),
    "add": _arith("add", 1),
    "rev": _sequence("rev", lambda x: x.flip(1)),
    "inc": _sequence("inc", lambda x: (x + 1) % SYMBOLS),
}
CHANCE = {"add": 1 / MODULUS, "rev": SYMBOLS**-SEQ_K, "inc": SYMBOLS**-SEQ_K}  # uniform guessing over symbols


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


def mixture_batch(tasks: tuple[str, ...], n: int, g: torch.Generator) -> Batch:
    """`n` examples split evenly across `tasks` (the remainder to the first)."""
    sizes = [n // len(tasks)] * len(tasks)
    sizes[0] += n - sum(sizes)
    parts = [make_batch(t, k, g) for t, k in zip(tasks, sizes) if k]
    return Batch(torch.cat([b.tokens for b in parts]), torch.cat([b.answer for b in parts]))
