"""Tensor-wide statistics computed exactly out of core, as reducer passes over a tensor's chunks.

- `exact`: sums of float32 values and of products of float32 values (norms, dot products),
  exact until one final rounding, so they do not depend on how the tensor was cut.
- `topk`: the exact top-k magnitude threshold by radix select over float bit patterns, with
  ties broken by lowest flat index.
"""
