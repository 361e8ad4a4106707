"""Tensor-wide statistics computed out of core, as reducer passes over a tensor's chunks, and
independent of how the tensor was cut.

- `pairwise`: sums of float32 values and of products of float32 values (norms, dot products)
  in one fixed pairwise order over the flat index.
- `gram`: the Gram entries of a few vectors per tensor (SLERP, model stock), from `pairwise`.
- `topk`: the exact top-k magnitude threshold by radix select over float bit patterns, with
  ties broken by lowest flat index.
"""
