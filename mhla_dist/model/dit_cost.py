"""Analytic parameter and FLOP counts of the DiT, for presets and MFU.

Notation: `h` hidden size, `L` depth, `N` tokens, `M` MHLA blocks, `H` heads of `d = h/H`,
`F` MLP hidden size, `p = C pt ph pw` values per token, `f = 256` timestep frequencies.
"""

from __future__ import annotations

from mhla_dist.config.dit import DiTConfig

from .dit_layers import FREQUENCY_EMBEDDING_SIZE


def _attention_parameters(cfg: DiTConfig, bias: bool) -> int:
    """q, k, v, o of `H d` channels (+ their biases)."""
    h, hd = cfg.hidden_size, cfg.num_heads * cfg.head_dim
    return 4 * h * hd + (3 * hd + h) * bias


def dit_num_parameters(cfg: DiTConfig) -> int:
    """The whole model's trainable parameters (all TP shards), without building it.

    Both archs: patch embedding `p h + h`; timestep MLP `f h + h + h^2 + h`; class table
    `(classes + 1) h`; caption MLP `c h + h + h^2 + h`; caption-token MLP
    `t h + h + h^2 + h`; per block: attention `4 h^2` (+ `4 h` biases), `Mc` `M^2`
    (`H M^2` per head; MHLA blocks only), MLP `2 h F` (+ `F + h` biases), with caption
    tokens a cross-attention `4 h^2 + 4 h` and its affine norm `2 h`.
    arch "dit": learned position embedding `N h`; per block adaLN `6 h^2 + 6 h`; final
    layer `2 h^2 + 2 h + h p + p`; the cross-attention has q/k norms `2 h`.
    arch "wan": time projection `6 h^2 + 6 h`; per block q/k norms `2 h` (self- and
    cross-attention), modulation table `6 h`; head `2 h + h p + p`.
    """
    h, f_mlp, p, hd = cfg.hidden_size, cfg.mlp_hidden_size, cfg.patch_dim, \
        cfg.num_heads * cfg.head_dim
    wan = cfg.arch == "wan"
    total = p * h + h
    total += cfg.num_tokens * h if cfg.pos_embed == "learned" else 0
    total += FREQUENCY_EMBEDDING_SIZE * h + h + h * h + h
    total += (cfg.num_classes + 1) * h if cfg.num_classes else 0
    total += cfg.caption_dim * h + h + h * h + h if cfg.caption_dim else 0
    total += cfg.text_dim * h + h + h * h + h if cfg.text_dim else 0
    bias = cfg.bias or wan
    block = _attention_parameters(cfg, bias) + 2 * h * f_mlp + (f_mlp + h) * bias
    block += (_attention_parameters(cfg, True) + 2 * hd + 2 * h) if cfg.text_dim else 0
    if wan:
        total += 6 * h * h + 6 * h
        block += 2 * hd + 6 * h
        head = 2 * h + h * p + p
    else:
        block += 6 * h * h + 6 * h
        head = 2 * h * h + 2 * h + h * p + p
    mixing = cfg.num_blocks**2 * (cfg.num_heads if cfg.per_head_mixing else 1)
    total += cfg.depth * block + (cfg.depth - len(cfg.softmax_layers)) * mixing
    return total + head


def dit_flops_per_sample(cfg: DiTConfig, text_tokens: int | None = None) -> int:
    """Forward + backward FLOPs for one clip (backward = 2x forward, so 3x the forward).

    Forward, with a multiply-add counted as 2 FLOPs:
    - token matmuls: `2 N (p h + L (4 h^2 + 2 h F) + h p)`;
    - per-clip matmuls (conditioning): `2 (f h + h^2 [+ c h + h^2] + 6 L h^2 + 2 h^2)`
      (arch "wan": one `6 h^2` time projection instead of one per block, no `2 h^2`);
    - MHLA per layer and head (DESIGN §1 "Cost", the normaliser's `z` as one extra value
      column): summaries `2 N d (d+1)`, mix `2 M^2 d (d+1)`, outputs `2 N d (d+1)`;
    - softmax layers per head: `4 N^2 d` (`Q K^T` and `A V`);
    - caption tokens (`T = text_tokens`, default `text_len`): their MLP `2 T (t h + h^2)`,
      per layer the cross-attention's q and o `4 N h^2`, k and v `4 T h^2`, and its
      scores `4 N T h`.
    Norms, activations, modulation and the softmax itself are not counted (the usual MFU
    convention). Total: `3 x forward`. Under CP the ranks split these FLOPs; per rank it
    is this over the CP size.
    """
    h, f_mlp, p, n = cfg.hidden_size, cfg.mlp_hidden_size, cfg.patch_dim, cfg.num_tokens
    heads, d, m = cfg.num_heads, cfg.head_dim, cfg.num_blocks
    hd = heads * d
    tokens = 2 * n * (p * h + cfg.depth * (4 * h * hd + 2 * h * f_mlp) + h * p)
    if cfg.arch == "wan":
        cond = FREQUENCY_EMBEDDING_SIZE * h + h * h + 6 * h * h
    else:
        cond = FREQUENCY_EMBEDDING_SIZE * h + h * h + 6 * cfg.depth * h * h + 2 * h * h
    cond += cfg.caption_dim * h + h * h if cfg.caption_dim else 0
    n_softmax = len(cfg.softmax_layers)
    mhla = heads * (4 * n * d * (d + 1) + 2 * m * m * d * (d + 1))
    softmax = heads * 4 * n * n * d
    forward = tokens + 2 * cond + (cfg.depth - n_softmax) * mhla + n_softmax * softmax
    if cfg.text_dim:
        t = cfg.text_len if text_tokens is None else text_tokens
        forward += 2 * t * (cfg.text_dim * h + h * h)
        forward += cfg.depth * (4 * n * h * hd + 4 * t * h * hd + 4 * n * t * hd)
    return 3 * forward
