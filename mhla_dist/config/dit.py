"""The video DiT's configuration: one dataclass, its validation and the presets.

A clip `[C, F, H, W]` is cut into patches `(pt, ph, pw)`, giving a patch grid
`(F/pt, H/ph, W/pw)`; the patch grid is cut into `block_grid = (fb, hb, wb)` tiles, each
one MHLA block of `block_size = (F/pt/fb) (H/ph/hb) (W/pw/wb)` tokens. Tokens are ordered
block-major (`mhla_dist.model.patchify`), so context parallelism hands every rank whole
tiles, outermost (temporal) axis first, and only `num_blocks % cp == 0` is required.

`DiTConfig` is a plain dataclass with int/float/bool/str/list fields, so omegaconf can use
it as a structured config (`OmegaConf.structured(DiTConfig)`); YAML presets live in
`configs/dit/` under a `model:` section with `kind: dit` and these field names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from mhla_kernels import FEATURE_MAPS

MIXING_INITS = ("linear", "cos", "exp", "local")
ARCHS = ("dit", "wan")
POS_EMBEDS = ("sincos", "learned", "rope")
PREDICTIONS = ("velocity", "sample")
# feature_map="identity" needs normalize=False; the DiT's attention normalises.
DIT_FEATURE_MAPS = tuple(f for f in FEATURE_MAPS if f != "identity")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass
class DiTConfig:
    """A non-causal MHLA diffusion transformer over 3-D patch grids (images: frames=1).

    Attributes:
        kind: "dit" (the config loader picks this class by it).
        arch: "dit", the adaLN-Zero block of Peebles & Xie (a sin/cos or learned position
            embedding), or "wan", Wan2.1's block (`mhla_dist.model.wan`): q/k RMSNorm and
            3-D RoPE in self-attention, a learned modulation table per block added to one
            shared time projection, `pos_embed="rope"`; Wan checkpoints import into it
            (`tools/convert_checkpoint.py import-wan`).
        in_channels, frames, height, width: the clip `[C, F, H, W]` (latents or pixels).
        patch: `(pt, ph, pw)`, the patch size; the model predicts `in_channels` per pixel.
        block_grid: `(fb, hb, wb)`, MHLA blocks along each axis of the patch grid.
        hidden_size, depth, num_heads: transformer width, blocks, attention heads.
        mlp_ratio: MLP hidden size over `hidden_size` (GELU-tanh MLP).
        num_classes: class labels (a null class `num_classes` is added for classifier-free
            guidance); 0 = no class conditioning.
        caption_dim: width of a pooled caption embedding added to the conditioning; 0 = none.
        text_dim: width of caption *tokens* (a text encoder's `[L, text_dim]` output, e.g.
            umT5's 4096) that every block cross-attends to (softmax; the video tokens are
            the queries); 0 = no cross-attention. Pooled caption or tokens: one of the two,
            both are read from the shards' `emb.npy`.
        text_len: the most caption tokens a clip may have (Wan: 512); a longer caption is
            a bad sample (skipped and counted), never truncated.
        text_mask: True pads a batch's captions to the longest and masks the padding;
            False pads every caption with zero vectors to `text_len` and attends to all of
            them, as Wan2.1 was trained (what `import-wan` sets).
        ffn_dim: MLP hidden size; 0 = `int(hidden_size * mlp_ratio)` (Wan2.1-1.3B: 8960).
        rope_theta: base of the 3-D rotary embedding (`pos_embed="rope"`).
        norm_eps: epsilon of the LayerNorms and the q/k RMSNorms of `arch="wan"`.
        mixing_init: distance transform of the 3-D block-grid `Mc` initialiser.
        feature_map: MHLA feature map `phi` ("relu" or "elu").
        per_head_mixing: one `Mc` per head instead of a shared one.
        softmax_layers: indices of blocks that use softmax attention (SDPA) instead of MHLA.
        pos_embed: "sincos" (fixed 3-D sinusoidal) or "learned" (arch "dit"); "rope" (arch
            "wan": Wan's 3-D rotary embedding, head channels split over (f, h, w); in MHLA
            layers it rotates q and k before the feature map, keeping them positive).
        bias: biases in the attention and MLP linears (DiT uses them).
        class_dropout: probability of replacing a label by the null class in training
            (applied by `rectified_flow.drop_labels`, not by the model).
        caption_dropout: probability of replacing a caption (pooled or tokens) by zeros
            (the unconditional caption of guidance) in training
            (`rectified_flow.drop_captions`); drawn independently of the label's.
        activation_checkpointing: recompute every block in the backward pass.
        prediction: what the network's last layer predicts. "velocity" (the default; SD3,
            Wan): the rectified-flow velocity itself. "sample": the clean clip `x0`
            (x-prediction, Li & He 2025, "Back to Basics: Let Denoising Generative Models
            Denoise"), turned into the velocity `(x_t - x0) / max(t, 0.05)` inside the
            model, so the loss, the sampler and guidance see a velocity either way. It
            learns faster when a patch holds as many values as the hidden size or more,
            e.g. pixel-space DiTs with large patches (configs/dit/quickstart_video.yaml).
    """

    kind: str = "dit"
    arch: str = "dit"
    in_channels: int = 4
    frames: int = 1
    height: int = 32
    width: int = 32
    patch: list[int] = field(default_factory=lambda: [1, 2, 2])
    block_grid: list[int] = field(default_factory=lambda: [1, 4, 4])
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    caption_dim: int = 0
    text_dim: int = 0
    text_len: int = 512
    text_mask: bool = True
    ffn_dim: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    mixing_init: str = "linear"
    feature_map: str = "relu"
    per_head_mixing: bool = False
    softmax_layers: list[int] = field(default_factory=list)
    pos_embed: str = "sincos"
    bias: bool = True
    class_dropout: float = 0.1
    caption_dropout: float = 0.1
    activation_checkpointing: bool = False
    prediction: str = "velocity"

    # ---- derived sizes -------------------------------------------------------------
    @property
    def patch_grid(self) -> tuple[int, int, int]:
        """Patches along (frames, height, width)."""
        pt, ph, pw = self.patch
        return self.frames // pt, self.height // ph, self.width // pw

    @property
    def tile(self) -> tuple[int, int, int]:
        """Patches per MHLA block along (frames, height, width)."""
        return tuple(g // b for g, b in zip(self.patch_grid, self.block_grid, strict=True))

    @property
    def num_tokens(self) -> int:
        return math.prod(self.patch_grid)

    @property
    def num_blocks(self) -> int:
        return math.prod(self.block_grid)

    @property
    def block_size(self) -> int:
        """Tokens per MHLA block."""
        return math.prod(self.tile)

    @property
    def patch_dim(self) -> int:
        """Values per token of the patchified clip: `C * pt * ph * pw`."""
        return self.in_channels * math.prod(self.patch)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_size(self) -> int:
        return self.ffn_dim or int(self.hidden_size * self.mlp_ratio)

    @property
    def null_class(self) -> int:
        """The label of the unconditional (dropped) class."""
        return self.num_classes

    # ---- validation ----------------------------------------------------------------
    def validate(self) -> DiTConfig:
        """Raise `ValueError` naming the key, its value and what is allowed; returns self."""
        for key in ("in_channels", "frames", "height", "width", "hidden_size", "depth",
                    "num_heads"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} must be a positive integer")
        for key in ("patch", "block_grid"):
            value = list(getattr(self, key))
            if len(value) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                      for v in value):
                axes = "(pt, ph, pw)" if key == "patch" else "(fb, hb, wb)"
                raise ValueError(f"{key}={value!r} must be 3 positive integers {axes}")
        sizes = (("frames", self.frames), ("height", self.height), ("width", self.width))
        for i, (key, size) in enumerate(sizes):
            if size % self.patch[i]:
                raise ValueError(f"{key}={size} is not divisible by patch[{i}]={self.patch[i]}; "
                                 f"allowed patch[{i}]: a divisor of {size} ({_divisors(size)})")
        for i, ((key, size), grid) in enumerate(zip(sizes, self.patch_grid, strict=True)):
            if grid % self.block_grid[i]:
                raise ValueError(
                    f"block_grid[{i}]={self.block_grid[i]} does not divide the {grid} patches "
                    f"along {key} ({key}={size} / patch[{i}]={self.patch[i]}); allowed: a "
                    f"divisor of {grid} ({_divisors(grid)})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} does not divide hidden_size="
                             f"{self.hidden_size}; allowed: a divisor of {self.hidden_size}")
        if not self.mlp_ratio > 0 or (not self.ffn_dim and self.mlp_hidden_size < 1):
            raise ValueError(f"mlp_ratio={self.mlp_ratio} must be > 0 (MLP hidden size "
                             f"int(hidden_size * mlp_ratio) >= 1)")
        for key in ("num_classes", "caption_dim", "text_dim", "ffn_dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key}={value!r} must be an integer >= 0 (0 = none)")
        if self.caption_dim and self.text_dim:
            raise ValueError(f"caption_dim={self.caption_dim} (a pooled caption) and text_dim="
                             f"{self.text_dim} (caption tokens) both read emb.npy: set one "
                             "of them to 0")
        if isinstance(self.text_len, bool) or not isinstance(self.text_len, int) \
                or self.text_len < 1:
            raise ValueError(f"text_len={self.text_len!r} must be a positive integer")
        for key in ("rope_theta", "norm_eps"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}={getattr(self, key)} must be > 0")
        for key, allowed in (("arch", ARCHS), ("mixing_init", MIXING_INITS),
                             ("feature_map", DIT_FEATURE_MAPS), ("pos_embed", POS_EMBEDS),
                             ("prediction", PREDICTIONS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of "
                                 f"{', '.join(map(repr, allowed))}")
        if (self.arch == "wan") != (self.pos_embed == "rope"):
            raise ValueError(
                f"pos_embed={self.pos_embed!r} with arch={self.arch!r}: arch 'wan' uses "
                "pos_embed 'rope' (3-D RoPE in self-attention); arch 'dit' 'sincos' or "
                "'learned'")
        if self.arch == "wan" and self.head_dim % 2:
            raise ValueError(f"arch='wan' rotates pairs of head channels: head_dim="
                             f"{self.head_dim} (hidden_size / num_heads) must be even")
        layers = list(self.softmax_layers)
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int)
               or not 0 <= i < self.depth]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(f"softmax_layers={layers} must be distinct block indices in "
                             f"[0, depth={self.depth})")
        for key in ("class_dropout", "caption_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be in [0, 1)")
        return self

    def check_parallel(self, tp: int, cp: int) -> None:
        """Raise `ValueError` when `tp` tensor- or `cp` context-parallel ranks cannot split
        this model: heads and MLP over TP, whole MHLA blocks over CP."""
        if self.num_heads % tp:
            raise ValueError(f"tp={tp} does not divide num_heads={self.num_heads}")
        if self.mlp_hidden_size % tp:
            raise ValueError(f"tp={tp} does not divide the MLP hidden size "
                             f"{self.mlp_hidden_size} (hidden_size * mlp_ratio)")
        if self.num_blocks % cp:
            raise ValueError(
                f"cp={cp} does not divide the {self.num_blocks} MHLA blocks (block_grid="
                f"{list(self.block_grid)}); context parallelism shards whole blocks: "
                f"allowed cp: {_divisors(self.num_blocks)}")


# Preset model sections (configs/dit/*.yaml hold the same values). DiT-S/2, B/2, XL/2 are
# the widths and depths of Peebles & Xie on 256x256 images (32x32x4 latents); wan1.3b has
# Wan2.1-1.3B's width, depth and heads on its 480p latents (81 frames -> 21, 480x832 ->
# 60x104, 16 channels) with a pooled caption instead of cross-attention. Its patch grid
# is 21 x 30 x 52; 52 has no divisor 10, so the blocks are 3 x 5 x 4 = 60 tiles of
# 7 x 6 x 13 patches (CP over 2, 3, 4, 5, 6, 10, 12, ... ranks).
DIT_PRESETS: dict[str, dict] = {
    "tiny": dict(in_channels=4, frames=8, height=16, width=16, patch=[1, 2, 2],
                 block_grid=[2, 2, 2], hidden_size=64, depth=2, num_heads=4, mlp_ratio=4.0,
                 num_classes=10, caption_dim=0),
    "s2": dict(in_channels=4, frames=1, height=32, width=32, patch=[1, 2, 2],
               block_grid=[1, 4, 4], hidden_size=384, depth=12, num_heads=6, mlp_ratio=4.0,
               num_classes=1000, caption_dim=0),
    "b2": dict(in_channels=4, frames=1, height=32, width=32, patch=[1, 2, 2],
               block_grid=[1, 4, 4], hidden_size=768, depth=12, num_heads=12, mlp_ratio=4.0,
               num_classes=1000, caption_dim=0),
    "xl2": dict(in_channels=4, frames=1, height=32, width=32, patch=[1, 2, 2],
                block_grid=[1, 4, 4], hidden_size=1152, depth=28, num_heads=16,
                mlp_ratio=4.0, num_classes=1000, caption_dim=0, activation_checkpointing=True),
    "wan1.3b": dict(in_channels=16, frames=21, height=60, width=104, patch=[1, 2, 2],
                    block_grid=[3, 5, 4], hidden_size=1536, depth=30, num_heads=12,
                    mlp_ratio=4.0, num_classes=0, caption_dim=4096, class_dropout=0.0,
                    activation_checkpointing=True),
    # A CPU-sized Wan-architecture model for tests and smoke runs: RGB clips of 8 frames of
    # 16x16 (the synthetic shapes), caption tokens of width 32 (make_synthetic_video.py
    # --caption-dim 32 --text-tokens 16), 8 MHLA blocks of 64 tokens.
    "wan-tiny": dict(arch="wan", pos_embed="rope", in_channels=3, frames=8, height=16,
                     width=16, patch=[1, 2, 2], block_grid=[2, 2, 2], hidden_size=64, depth=2,
                     num_heads=4, ffn_dim=256, num_classes=0, caption_dim=0, text_dim=32,
                     text_len=16, class_dropout=0.0),
    # Wan2.1-T2V-1.3B itself (diffusers' WanTransformer3DModel config): its blocks, umT5
    # caption tokens by cross-attention, 3-D RoPE; self-attention MHLA over the tiles above.
    "wan2.1-1.3b": dict(arch="wan", pos_embed="rope", in_channels=16, frames=21, height=60,
                        width=104, patch=[1, 2, 2], block_grid=[3, 5, 4], hidden_size=1536,
                        depth=30, num_heads=12, ffn_dim=8960, num_classes=0, caption_dim=0,
                        text_dim=4096, text_len=512, text_mask=False, class_dropout=0.0,
                        activation_checkpointing=True),
}

# The parameter count each preset's name promises (tiny promises nothing).
DIT_PRESET_PARAMS: dict[str, float] = {"s2": 33e6, "b2": 130e6, "xl2": 675e6,
                                       "wan1.3b": 1.3e9, "wan2.1-1.3b": 1.42e9}


def dit_config(preset: str | None = None, **overrides) -> DiTConfig:
    """A validated `DiTConfig` from a preset name (or the defaults) and field overrides."""
    if preset is not None and preset not in DIT_PRESETS:
        raise ValueError(f"preset={preset!r} is not one of {', '.join(map(repr, DIT_PRESETS))}")
    known = {f.name for f in fields(DiTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown DiTConfig key(s) {unknown}; allowed: {sorted(known)}")
    values = {**(DIT_PRESETS[preset] if preset else {}), **overrides}
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return DiTConfig(**values).validate()
