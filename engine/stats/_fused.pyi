from typing_extensions import Buffer

GROUP: int
ABI: int

def group_sums(
    streams: tuple[Buffer, ...],
    vectors: tuple[tuple[int, int], ...],
    pairs: tuple[tuple[int, int], ...],
    out: Buffer,
    threads: int = 1,
) -> None: ...
def combine(
    streams: tuple[Buffer, ...],
    steps: tuple[
        tuple[int, int, float | None]
        | tuple[int, int, float | None, int]
        | tuple[int, int, float | None, int, tuple[int, ...]]
        | tuple[int, int, float | None, int, tuple[int, ...], tuple[float, ...]],
        ...,
    ],
    out: Buffer,
    nan: int,
    threads: int = 1,
    start: int = 0,
    keys: tuple[int, ...] = (),
    f16_payload: bool = True,
) -> None: ...
def key_histograms(
    streams: tuple[Buffer, ...], selections: tuple[tuple[int, int], ...], out: Buffer, threads: int = 1
) -> None: ...
def key_ties(
    streams: tuple[Buffer, ...], selections: tuple[tuple[int, int, int], ...], threads: int = 1
) -> tuple[tuple[int, int], ...]: ...
def count_nonfinite(values: Buffer, exponent: int) -> int: ...
def magprune(
    delta: Buffer,
    row_numel: int,
    density: float,
    epsilon: float,
    rescale: bool,
    key: int,
    start: int,
    threads: int = 1,
) -> None: ...
