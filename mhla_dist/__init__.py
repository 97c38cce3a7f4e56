"""mhla-dist: distributed training for long-sequence MHLA models."""
