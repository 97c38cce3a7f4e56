"""Structured configs (omegaconf): model, parallel layout, data, optimiser, ZeRO, schedule, logging, checkpointing."""
