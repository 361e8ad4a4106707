"""File formats: reading checkpoints, writing merged shards, journals."""
