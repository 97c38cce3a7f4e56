"""Parameter and FLOP counts of the MHLA language model, from its config alone.

FLOPs per token of a training step (forward + backward = 3x forward), for MFU:

    matmuls:   6 x (every weight matrix a token goes through: layers + the head)
    MHLA:      3 x per layer and head, forward  2 d dv (summaries S += k v^T)
                                              + 2 d dv (output q^T state)
                                              + 2 c (d + dv) (masked intra-sub-chunk scores
                                                and values, c = the 64-token sub-chunk; half
                                                of it is masked away but computed)
                                              + 2 M^2 d dv / N (the mix, shared by N tokens)
    softmax:   3 x per softmax layer and head, forward 2 N d + 2 N dv (causal, halved)

The embedding lookup is free; a tied head still costs its matmul.
"""

from __future__ import annotations

from mhla_dist.config import LMConfig, resolve_lm

SUBCHUNK = 64


def lm_num_parameters(cfg: LMConfig) -> int:
    """Parameters of the whole model (all TP ranks together)."""
    c = resolve_lm(cfg)
    h, width = c.hidden_size, c.num_heads * c.head_dim
    attn = 3 * h * width + width * h + (h * width if c.output_gate else 0)
    attn += c.head_dim if c.output_norm else 0
    mixing = c.num_blocks**2 * (c.num_heads if c.per_head_mixing else 1)
    mlp = 3 * h * c.ffn_hidden_size
    per_layer = attn + mlp + 2 * h
    mhla_layers = c.num_layers - len(c.softmax_layers)
    head = 0 if c.tie_embeddings else c.vocab_size * h
    return (c.num_layers * per_layer + mhla_layers * mixing + c.vocab_size * h + head + h)


def lm_flops_per_token(cfg: LMConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token at `seq_len` (default max_seq_len)."""
    c = resolve_lm(cfg)
    n = seq_len or c.max_seq_len
    h, width, d = c.hidden_size, c.num_heads * c.head_dim, c.head_dim
    matmul = c.num_layers * (4 * h * width + (h * width if c.output_gate else 0)
                             + 3 * h * c.ffn_hidden_size) + c.vocab_size * h
    chunk = min(SUBCHUNK, c.block_size)
    blocks = max(1, n // c.block_size)
    mhla = c.num_heads * (4 * d * d + 2 * chunk * 2 * d + 2 * blocks**2 * d * d / n)
    softmax = c.num_heads * (2 * n * d + 2 * n * d) / 2
    layers_softmax = len(c.softmax_layers)
    attention = (c.num_layers - layers_softmax) * mhla + layers_softmax * softmax
    return 6 * matmul + 3 * attention
