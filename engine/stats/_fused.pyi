from typing_extensions import Buffer

GROUP: int

def group_sums(vectors: tuple[Buffer, ...], pairs: tuple[tuple[int, int], ...], out: Buffer) -> None: ...
