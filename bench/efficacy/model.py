"""The tiny model: transformers' `LlamaForCausalLM`, saved with `save_pretrained` as safetensors.

A real Hugging Face Llama folder (config.json, model.safetensors) is what users give leanmerge,
so the experiment merges the same kind of input. Weights are saved in float32: the deltas of a
tiny model are a few bf16 ulps, and rounding them would blur what dropping does to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from bench.efficacy.tasks import SEQ_LEN, VOCAB


@dataclass(frozen=True)
class ModelSize:
    hidden: int = 256
    layers: int = 2
    heads: int = 8
    mlp: int = 512


def build(size: ModelSize, seed: int) -> LlamaForCausalLM:
    """A freshly initialized Llama of `size`, its init drawn from a generator seeded by `seed`."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=size.hidden,
        intermediate_size=size.mlp,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="eager",
    )
    with torch.random.fork_rng():  # the init uses the global RNG: keep it from leaking out
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def save(model: LlamaForCausalLM, folder: Path) -> Path:
    """`model` as a Hugging Face folder (config.json + model.safetensors)."""
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def load_weights(model: LlamaForCausalLM, folder: Path) -> LlamaForCausalLM:
    """`model` (of the folder's shape) with the weights of `folder`'s safetensors files: much
    faster than `from_pretrained` for the hundred small merges of a run; every tensor must be there."""
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()
