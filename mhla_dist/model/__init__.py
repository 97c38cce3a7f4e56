"""Models: layers, the MHLA language model and the MHLA video DiT."""
