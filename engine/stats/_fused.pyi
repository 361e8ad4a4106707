from typing_extensions import Buffer

GROUP: int

def group_sums(
    streams: tuple[Buffer, ...],
    vectors: tuple[tuple[int, int], ...],
    pairs: tuple[tuple[int, int], ...],
    out: Buffer,
    threads: int = 1,
) -> None: ...
def combine(
    streams: tuple[Buffer, ...],
    steps: tuple[tuple[int, int, float | None], ...],
    out: Buffer,
    nan: int,
    threads: int = 1,
) -> None: ...
def count_nonfinite(values: Buffer, exponent: int) -> int: ...
