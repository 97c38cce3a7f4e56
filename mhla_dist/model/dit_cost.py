"""Analytic parameter and FLOP counts of the DiT, for presets and MFU.

Notation: `h` hidden size, `L` depth, `N` tokens, `M` MHLA blocks, `H` heads of `d = h/H`,
`F` MLP hidden size, `p = C pt ph pw` values per token, `f = 256` timestep frequencies.
"""

from __future__ import annotations

from mhla_dist.config.dit import DiTConfig

from .dit_layers import FREQUENCY_EMBEDDING_SIZE


def dit_num_parameters(cfg: DiTConfig) -> int:
    """The whole model's trainable parameters (all TP shards), without building it.

    patch embedding `p h + h`; learned position embedding `N h`; timestep MLP
    `f h + h + h^2 + h`; class table `(classes + 1) h`; caption MLP `c h + h + h^2 + h`;
    per block: adaLN `6 h^2 + 6 h`, attention `4 h^2` (+ `4 h` biases), `Mc` `M^2` (`H M^2`
    per head; MHLA blocks only), MLP `2 h F` (+ `F + h` biases); final layer
    `2 h^2 + 2 h + h p + p`.
    """
    h, f_mlp, p = cfg.hidden_size, cfg.mlp_hidden_size, cfg.patch_dim
    total = p * h + h
    total += cfg.num_tokens * h if cfg.pos_embed == "learned" else 0
    total += FREQUENCY_EMBEDDING_SIZE * h + h + h * h + h
    total += (cfg.num_classes + 1) * h if cfg.num_classes else 0
    total += cfg.caption_dim * h + h + h * h + h if cfg.caption_dim else 0
    attn = 4 * h * cfg.num_heads * cfg.head_dim + (3 * cfg.num_heads * cfg.head_dim + h) * cfg.bias
    mixing = cfg.num_blocks**2 * (cfg.num_heads if cfg.per_head_mixing else 1)
    block = 6 * h * h + 6 * h + attn + 2 * h * f_mlp + (f_mlp + h) * cfg.bias
    total += cfg.depth * block + (cfg.depth - len(cfg.softmax_layers)) * mixing
    return total + 2 * h * h + 2 * h + h * p + p


def dit_flops_per_sample(cfg: DiTConfig) -> int:
    """Forward + backward FLOPs for one clip (backward = 2x forward, so 3x the forward).

    Forward, with a multiply-add counted as 2 FLOPs:
    - token matmuls: `2 N (p h + L (4 h^2 + 2 h F) + h p)`;
    - per-clip matmuls (conditioning): `2 (f h + h^2 [+ c h + h^2] + 6 L h^2 + 2 h^2)`;
    - MHLA per layer and head (DESIGN §1 "Cost", the normaliser's `z` as one extra value
      column): summaries `2 N d (d+1)`, mix `2 M^2 d (d+1)`, outputs `2 N d (d+1)`;
    - softmax layers per head: `4 N^2 d` (`Q K^T` and `A V`).
    Norms, activations, modulation and the softmax itself are not counted (the usual MFU
    convention). Total: `3 x forward`. Under CP the ranks split these FLOPs; per rank it
    is this over the CP size.
    """
    h, f_mlp, p, n = cfg.hidden_size, cfg.mlp_hidden_size, cfg.patch_dim, cfg.num_tokens
    heads, d, m = cfg.num_heads, cfg.head_dim, cfg.num_blocks
    hd = heads * d
    tokens = 2 * n * (p * h + cfg.depth * (4 * h * hd + 2 * h * f_mlp) + h * p)
    cond = FREQUENCY_EMBEDDING_SIZE * h + h * h + 6 * cfg.depth * h * h + 2 * h * h
    cond += cfg.caption_dim * h + h * h if cfg.caption_dim else 0
    n_softmax = len(cfg.softmax_layers)
    mhla = heads * (4 * n * d * (d + 1) + 2 * m * m * d * (d + 1))
    softmax = heads * 4 * n * n * d
    forward = tokens + 2 * cond + (cfg.depth - n_softmax) * mhla + n_softmax * softmax
    return 3 * forward
