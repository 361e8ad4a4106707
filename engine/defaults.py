"""Names and defaults the command line shows in `--help`, importable without torch.

`leanmerge --help` must not import the engine (torch costs ~2 s and ~220 MB), so what the help
lists lives here, and the modules that own each value import it from here.
"""

from __future__ import annotations

# Every method in engine.methods.registry.METHODS, sorted (a test keeps the two equal).
METHOD_NAMES = (
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "linear",
    "model_stock",
    "passthrough",
    "ram",
    "ramplus_tl",
    "sce",
    "slerp",
    "task_arithmetic",
    "ties",
)
# Methods that take no fine-tuned model besides the base.
NO_MODEL_METHODS = frozenset({"passthrough"})
# How embedding-like tensors whose row count differs between models are merged (engine.vocab).
VOCAB_POLICIES = ("base", "union")
DEFAULT_SHARD_SIZE = 5 * 10**9  # Hugging Face's default "5GB", mergekit's "5B"
SYNC_EVERY = 256 << 20  # bytes written between durable journal commits (engine.io.write_behind)
SAMPLE_ELEMS = 1 << 16  # elements `inspect` reads per tensor for its delta statistics
