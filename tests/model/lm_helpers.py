"""Shared pieces of the LM tests."""

import torch

from mhla_dist.config import LMConfig

TINY = dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=64,
            block_size=8, rotary=True)


def tiny_lm_config(**overrides) -> LMConfig:
    return LMConfig(**{**TINY, **overrides})


def build(**overrides):
    """The tiny LM in float64, the same weights for the same overrides (seeded), on the
    world of one the calling test module builds."""
    from mhla_dist.model.lm import MHLALanguageModel

    torch.manual_seed(0)
    return MHLALanguageModel(tiny_lm_config(**overrides)).double()


def token_batch(batch=2, n=64, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab, (batch, n + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]
