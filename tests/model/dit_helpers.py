"""Shared pieces of the DiT tests."""

import torch


def batch(cfg, b=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    clip = torch.randn(b, cfg.in_channels, cfg.frames, cfg.height, cfg.width, generator=g,
                       dtype=dtype)
    noise = torch.randn(clip.shape, generator=g, dtype=dtype)
    t = torch.rand(b, generator=g, dtype=dtype)
    labels = torch.randint(0, cfg.num_classes + 1, (b,), generator=g)
    return clip, noise, t, labels if cfg.num_classes else None


def text_batch(cfg, b=2, length=5, seed=4, dtype=torch.float32):
    """`(text [b, length, text_dim], mask [b, length])` for a model with caption tokens
    (`()` without): the first row's last two tokens are padding, random values masked out."""
    if not cfg.text_dim:
        return ()
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(b, length, cfg.text_dim, generator=g, dtype=dtype)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, length - 2:] = False
    return text, mask


def perturb(model, seed=1, scale=0.05):
    """Move every weight off its initialisation (adaLN-Zero would zero most gradients)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.rand(p.shape, generator=g, dtype=p.dtype) if "mixing" in name \
                else torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.mul_(1 + 0.5 * noise) if "mixing" in name else p.add_(scale * noise)
