"""Merge methods: one module per family, each a pure function over float32 chunks."""
