"""Generate Llama-shaped *homologous* model folders (a base plus fine-tunes) for tests.

Merging engines need families of checkpoints that share names and shapes and differ by small,
known deltas; real checkpoints are huge and slow to fetch, so this tool synthesises them.  It
streams: every tensor is generated and written in row chunks of at most ~32 MiB of float32
work space, so peak memory stays flat even for multi-GiB tensors (e.g. a 128256 x 8192
embedding).  The safetensors container is written by hand because the library's writers need
the whole tensor in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click
import torch

CHUNK_BYTES = 32 * 1024 * 1024  # float32 work space per chunk; bounds peak RSS per worker.
BASE_STD = 0.02  # typical init scale of Llama linear/embedding weights
NORM_STD = 0.01  # RMSNorm weights sit near 1.0; a little noise makes them non-trivial to merge
WORKERS = max(1, min(4, torch.get_num_threads()))  # torch RNG is single-threaded per call

DTYPES: dict[str, tuple[torch.dtype, str, str]] = {
    # name -> (torch dtype, safetensors dtype tag, config.json torch_dtype)
    "bf16": (torch.bfloat16, "BF16", "bfloat16"),
    "fp16": (torch.float16, "F16", "float16"),
    "fp32": (torch.float32, "F32", "float32"),
}


@dataclass(frozen=True)
class SyntheticShape:
    """Architecture knobs of a synthetic Llama; the defaults give a tiny model for unit tests."""

    hidden: int = 64
    intermediate: int = 172
    layers: int = 2
    vocab: int = 1000
    heads: int = 4
    kv_heads: int = 2
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        """Reject shapes that no Llama loader would accept, so bad presets fail early."""
        sizes = (self.hidden, self.intermediate, self.layers, self.vocab, self.heads, self.kv_heads)
        if min(sizes) <= 0:
            raise ValueError(f"all sizes must be positive: {self}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden % heads and heads % kv_heads must be 0: {self}")


PRESETS: dict[str, SyntheticShape] = {
    "tiny": SyntheticShape(),
    "small": SyntheticShape(hidden=512, intermediate=1376, layers=2, vocab=8000, heads=8, kv_heads=4),
    "llama1b-embed": SyntheticShape(hidden=2048, intermediate=8192, layers=2, vocab=128256, heads=32, kv_heads=8),
    "llama8b-embed": SyntheticShape(hidden=4096, intermediate=14336, layers=1, vocab=128256, heads=32, kv_heads=8),
    "llama70b-layer": SyntheticShape(hidden=8192, intermediate=28672, layers=1, vocab=128256, heads=64, kv_heads=8),
}


def llama_tensors(shape: SyntheticShape) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes in the order HF Llama checkpoints list them.

    Matching the real order matters because engines may rely on file order for streaming and
    sharding heuristics; lm_head is omitted when embeddings are tied, as HF does.
    """
    h, kv = shape.hidden, (shape.hidden // shape.heads) * shape.kv_heads
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, h))]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (shape.intermediate, h)),
            (p + "mlp.up_proj.weight", (shape.intermediate, h)),
            (p + "mlp.down_proj.weight", (h, shape.intermediate)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not shape.tie_embeddings:
        out.append(("lm_head.weight", (shape.vocab, h)))
    return out


_Tensors = list[tuple[int, str, tuple[int, ...]]]  # (index in llama_tensors, name, shape)


def _seed(*key: object) -> int:
    """Stable 63-bit seed from a key; blake2b (not Python's salted hash()) keeps runs reproducible."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _gen(*key: object) -> torch.Generator:
    """A fresh CPU generator per chunk, so chunks are independent and can be made in parallel."""
    return torch.Generator().manual_seed(_seed(*key))


def _chunk_rows(shape: tuple[int, ...]) -> int:
    """Rows per chunk such that one float32 chunk stays within CHUNK_BYTES."""
    row = math.prod(shape[1:]) * 4
    return max(1, CHUNK_BYTES // row)


@dataclass(frozen=True)
class _Spec:
    """What varies between models of a family; bundled so helpers take one argument."""

    seed: int
    delta_of: int | None
    delta_scale: float
    dtype: str


class _Slot:
    """Reusable buffers for one in-flight chunk.

    Allocating fresh ~32 MiB tensors per chunk churns glibc's heap (chunks just under its mmap
    threshold land in per-thread arenas and are not returned), which measured ~4x higher peak
    RSS; a small fixed ring of slots keeps memory flat and avoids page-fault overhead.
    """

    def __init__(self) -> None:
        self.work = torch.empty(0)
        self.noise = torch.empty(0)
        self.out = torch.empty(0, dtype=torch.uint8)

    def fit(self, n: int) -> None:
        """Grow the buffers (once, normally to CHUNK_BYTES) so that n elements fit."""
        n = max(n, CHUNK_BYTES // 4)
        if self.work.numel() < n:
            self.work, self.noise = torch.empty(n), torch.empty(n)
            self.out = torch.empty(n * 4, dtype=torch.uint8)  # fits every dtype up to fp32


def _make_chunk(spec: _Spec, slot: _Slot, name: str, ti: int, ci: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Generate one chunk into `slot`; returns its raw little-endian bytes (a uint8 view).

    Base values come from a generator keyed by (seed, tensor, chunk); fine-tune k adds
    delta_scale * noise keyed by (seed, k, tensor, chunk), computed in float32, then cast once.
    """
    dtype = DTYPES[spec.dtype][0]
    n = math.prod(shape)
    slot.fit(n)
    work = slot.work[:n].view(shape)
    mean, std = (1.0, NORM_STD) if name.endswith("norm.weight") else (0.0, BASE_STD)
    work.normal_(mean, std, generator=_gen("base", spec.seed, ti, ci))
    if spec.delta_of is not None:
        noise = slot.noise[:n].view(shape)
        noise.normal_(0.0, 1.0, generator=_gen("delta", spec.seed, spec.delta_of, ti, ci))
        work.add_(noise, alpha=spec.delta_scale)
    out = slot.out[: n * dtype.itemsize]
    out.view(dtype).view(shape).copy_(work)  # same round-to-nearest-even as .to(dtype)
    return out


def _chunks(spec: _Spec, tensors: _Tensors, pool: ThreadPoolExecutor) -> Iterator[torch.Tensor]:
    """Yield every chunk's bytes in file order, computing up to WORKERS chunks ahead.

    Each yielded view must be consumed (written) before the generator is resumed: slot
    c % (WORKERS + 1) is reused by chunk c + WORKERS + 1, which is submitted only after chunk c
    has been yielded and the consumer has come back for more.
    """
    slots = [_Slot() for _ in range(WORKERS + 1)]
    pending: deque[Future[torch.Tensor]] = deque()
    c = 0
    for ti, name, shape in tensors:
        step = _chunk_rows(shape)
        for ci, r0 in enumerate(range(0, shape[0], step)):
            part = (min(step, shape[0] - r0), *shape[1:])
            slot = slots[c % len(slots)]
            pending.append(pool.submit(_make_chunk, spec, slot, name, ti, ci, part))
            c += 1
            if len(pending) > WORKERS:
                yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _write_file(path: Path, spec: _Spec, tensors: _Tensors, pool: ThreadPoolExecutor) -> None:
    """Write one safetensors file by hand: u64 header length, padded JSON header, raw data."""
    dtype, tag, _ = DTYPES[spec.dtype]
    itemsize = dtype.itemsize
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for _, name, shape in tensors:
        end = offset + math.prod(shape) * itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # align the data section to 8 bytes
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for chunk in _chunks(spec, tensors, pool):
            f.write(chunk.numpy().data)  # zero-copy view of the slot's bytes
        if f.tell() != 8 + len(raw) + offset:
            raise RuntimeError(f"{path}: wrote {f.tell()} bytes, expected {8 + len(raw) + offset}")


def _split(sizes: list[int], shards: int) -> list[int]:
    """Contiguous groups of roughly equal bytes; returns the start index of each group."""
    if not 1 <= shards <= len(sizes):
        raise ValueError(f"shards must be in 1..{len(sizes)}, got {shards}")
    total, starts, i, acc = sum(sizes), [0], 0, 0
    for s in range(1, shards):
        target = total * s / shards
        # Take at least one tensor per group, leave at least one per remaining group, and
        # stop where the next tensor's midpoint crosses the target boundary.
        acc += sizes[i]
        i += 1
        while len(sizes) - i > shards - s and acc + sizes[i] / 2 <= target:
            acc += sizes[i]
            i += 1
        starts.append(i)
    return starts


def _json(path: Path, obj: object) -> None:
    """Write pretty JSON, as HF does, so humans can diff the folders."""
    path.write_text(json.dumps(obj, indent=2) + "\n")


# Minimal but valid tokenizer files (a 3-token WordLevel model); merges copy them from the base.
_TOKENIZER_CONFIG = '{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}\n'
_TOKENIZER = (
    '{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,'
    ' "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null, "model":'
    ' {"type": "WordLevel", "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2}, "unk_token": "<unk>"}}\n'
)


def _side_files(folder: Path, shape: SyntheticShape, dtype_name: str) -> None:
    """config/generation/tokenizer files so HF-style loaders recognise the folder."""
    _json(
        folder / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": shape.hidden,
            "intermediate_size": shape.intermediate,
            "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads,
            "head_dim": shape.hidden // shape.heads,
            "vocab_size": shape.vocab,
            "tie_word_embeddings": shape.tie_embeddings,
            "torch_dtype": DTYPES[dtype_name][2],
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096,
            "rope_theta": 500000.0,
            "attention_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "initializer_range": BASE_STD,
        },
    )
    _json(folder / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    (folder / "tokenizer_config.json").write_text(_TOKENIZER_CONFIG)
    (folder / "tokenizer.json").write_text(_TOKENIZER)


def write_model(
    folder: Path,
    shape: SyntheticShape,
    *,
    seed: int,
    delta_of: int | None = None,
    delta_scale: float = 0.01,
    dtype: str = "bf16",
    shards: int = 1,
) -> Path:
    """Write one model folder and return it.

    delta_of=None writes the base (seeded by `seed`); delta_of=k writes fine-tune k =
    base + delta_scale * noise_k, noise keyed by (seed, k, tensor index, chunk index).  The base
    chunk is regenerated rather than read back, so fine-tunes never need the base on disk.
    Output is deterministic for fixed arguments.  Stale model*.safetensors files and the index
    in `folder` are removed first so a re-run with different sharding leaves no leftovers.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if delta_of is not None and delta_of < 1:
        raise ValueError(f"delta_of must be >= 1, got {delta_of}")
    if sys.byteorder != "little":
        raise RuntimeError("safetensors data is little-endian; big-endian hosts are unsupported")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("model*.safetensors"), folder / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    spec = _Spec(seed, delta_of, delta_scale, dtype)
    tensors = [(ti, n, s) for ti, (n, s) in enumerate(llama_tensors(shape))]
    sizes = [math.prod(s) * DTYPES[dtype][0].itemsize for _, _, s in tensors]
    starts = _split(sizes, shards) + [len(tensors)]
    with ThreadPoolExecutor(WORKERS) as pool:
        if shards == 1:
            _write_file(folder / "model.safetensors", spec, tensors, pool)
        else:
            weight_map: dict[str, str] = {}
            for s in range(shards):
                fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
                group = tensors[starts[s] : starts[s + 1]]
                _write_file(folder / fname, spec, group, pool)
                weight_map.update({name: fname for _, name, _ in group})
            _json(
                folder / "model.safetensors.index.json",
                {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map},
            )
    _side_files(folder, shape, dtype)
    return folder


def make_family(
    out_dir: Path,
    shape: SyntheticShape,
    *,
    n_models: int = 2,
    seed: int = 0,
    delta_scale: float = 0.01,
    dtype: str = "bf16",
    shards: int = 1,
) -> tuple[Path, list[Path]]:
    """Write out_dir/base and out_dir/ft1..ftN (fine-tunes of that base); returns (base, [fts])."""
    folders = [
        write_model(
            out_dir / ("base" if k == 0 else f"ft{k}"),
            shape,
            seed=seed,
            delta_of=k or None,
            delta_scale=delta_scale,
            dtype=dtype,
            shards=shards,
        )
        for k in range(n_models + 1)
    ]
    return folders[0], folders[1:]


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True)
@click.option("--models", "n_models", type=int, default=2, show_default=True, help="Fine-tunes besides base.")
@click.option("--hidden", type=int, default=None)
@click.option("--intermediate", type=int, default=None)
@click.option("--layers", type=int, default=None)
@click.option("--vocab", type=int, default=None)
@click.option("--heads", type=int, default=None)
@click.option("--kv-heads", type=int, default=None)
@click.option("--tie-embeddings/--no-tie-embeddings", default=None)
@click.option("--shards", type=int, default=1, show_default=True)
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="bf16", show_default=True)
@click.option("--delta-scale", type=float, default=0.01, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def main(
    out_dir: Path,
    preset: str,
    n_models: int,
    hidden: int | None,
    intermediate: int | None,
    layers: int | None,
    vocab: int | None,
    heads: int | None,
    kv_heads: int | None,
    tie_embeddings: bool | None,
    shards: int,
    dtype: str,
    delta_scale: float,
    seed: int,
) -> None:
    """Write a synthetic Llama family (OUT_DIR/base, OUT_DIR/ft1..N).

    Size flags override the fields of --preset, so e.g. `--preset small --layers 4` works.
    """
    pre = PRESETS[preset]
    try:
        shape = SyntheticShape(
            hidden=pre.hidden if hidden is None else hidden,
            intermediate=pre.intermediate if intermediate is None else intermediate,
            layers=pre.layers if layers is None else layers,
            vocab=pre.vocab if vocab is None else vocab,
            heads=pre.heads if heads is None else heads,
            kv_heads=pre.kv_heads if kv_heads is None else kv_heads,
            tie_embeddings=pre.tie_embeddings if tie_embeddings is None else tie_embeddings,
        )
        base, fts = make_family(
            out_dir,
            shape,
            n_models=n_models,
            seed=seed,
            delta_scale=delta_scale,
            dtype=dtype,
            shards=shards,
        )
    except ValueError as exc:  # bad sizes/shards are user errors, not crashes
        raise click.UsageError(str(exc)) from exc
    total = 0
    for folder in [base, *fts]:
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        total += size
        click.echo(f"{folder}\t{size} bytes")
    click.echo(f"total\t{total} bytes")


if __name__ == "__main__":
    main()
