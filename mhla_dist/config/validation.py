"""Validation of a typed run config: every problem at once, each naming key and value."""

from __future__ import annotations

from dataclasses import replace

from .schema import Config, LMConfig

FEATURE_MAPS = ("relu", "elu", "identity")  # mhla_kernels.FEATURE_MAPS, kept import-free
PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("cosine", "wsd", "constant")
WANDB_MODES = ("offline", "online", "disabled")
DATA_KINDS = ("text", "video", "mqar")
MIXING_INITS = ("average", "identity", "ones")
INIT_OPTIMIZER = ("auto", "carry", "reset")


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem found."""


DEFAULT_BLOCK_SIZE = 64


def lm_block_size(m: LMConfig) -> int | None:
    """model.block_size, or max_seq_len / num_blocks, or the default; None if invalid."""
    if m.num_blocks is not None:
        if m.num_blocks < 1 or m.max_seq_len % m.num_blocks:
            return None
        return m.max_seq_len // m.num_blocks
    block = DEFAULT_BLOCK_SIZE if m.block_size is None else m.block_size
    return block if block >= 1 and m.max_seq_len % block == 0 else None


def default_ffn(hidden: int) -> int:
    """SwiGLU's ~8/3 x hidden, rounded up to a multiple of 64."""
    return -(-(8 * hidden // 3) // 64) * 64


def resolve_lm(m: LMConfig) -> LMConfig:
    """Fill the derived values (head_dim, ffn_hidden_size, block_size, num_blocks and
    embed_init_std, which defaults to init_std)."""
    block = lm_block_size(m)
    embed_std = m.init_std if m.embed_init_std is None else m.embed_init_std
    return replace(m, head_dim=m.head_dim or m.hidden_size // m.num_heads,
                   embed_init_std=embed_std,
                   ffn_hidden_size=m.ffn_hidden_size or default_ffn(m.hidden_size),
                   block_size=block, num_blocks=m.max_seq_len // block)


def _check_lm(m: LMConfig, cfg: Config, out: list[str]) -> None:
    if m.vocab_size < 2:
        out.append(f"model.vocab_size={m.vocab_size} must be >= 2")
    for key in ("hidden_size", "num_layers", "num_heads", "max_seq_len"):
        if getattr(m, key) < 1:
            out.append(f"model.{key}={getattr(m, key)} must be >= 1")
    if m.head_dim is None and m.num_heads >= 1 and m.hidden_size % m.num_heads:
        out.append(f"model.num_heads={m.num_heads} does not divide model.hidden_size="
                   f"{m.hidden_size}; set model.head_dim explicitly or change the heads")
    block = lm_block_size(m)
    if m.num_blocks is not None and block is None:
        out.append(f"model.num_blocks={m.num_blocks} does not divide model.max_seq_len="
                   f"{m.max_seq_len}")
    elif m.num_blocks is not None and m.block_size is not None and block != m.block_size:
        out.append(f"model.block_size={m.block_size} disagrees with model.max_seq_len="
                   f"{m.max_seq_len} / model.num_blocks={m.num_blocks}; give one of them")
    elif block is None:
        out.append(f"model.max_seq_len={m.max_seq_len} is not a multiple of model.block_size="
                   f"{m.block_size or DEFAULT_BLOCK_SIZE} (blocks hold whole tokens)")
    if m.feature_map not in FEATURE_MAPS:
        out.append(f"model.feature_map={m.feature_map!r} is not one of {', '.join(FEATURE_MAPS)}")
    elif m.normalize and (m.feature_map == "identity" or m.rotary):
        out.append("model.normalize=true needs non-negative features: it does not go with "
                   f"model.feature_map={m.feature_map!r} or model.rotary={m.rotary} "
                   "(use normalize=false with the output norm and gate)")
    _check_choice(out, "model.mixing_init", m.mixing_init, MIXING_INITS)
    bad_layers = [i for i in m.softmax_layers if not 0 <= i < m.num_layers]
    if bad_layers:
        out.append(f"model.softmax_layers={list(m.softmax_layers)} has indices outside "
                   f"[0, {m.num_layers})")
    if m.loss_chunk_tokens is not None:
        _check_at_least(out, "model.loss_chunk_tokens", m.loss_chunk_tokens, 1)
    for key in ("init_std", "embed_init_std"):
        value = getattr(m, key)
        if value is not None and not value > 0:
            out.append(f"model.{key}={value} must be > 0")
    tp, cp = cfg.parallel.tp, cfg.parallel.cp
    if tp >= 1 and m.num_heads % tp:
        out.append(f"parallel.tp={tp} does not divide model.num_heads={m.num_heads}")
    if block and cp >= 1 and (m.max_seq_len // block) % cp:
        out.append(f"parallel.cp={cp} does not divide the {m.max_seq_len // block} blocks of "
                   f"model.max_seq_len={m.max_seq_len} / block size {block} (context "
                   "parallelism shards whole blocks)")
    seq = cfg.data.seq_len
    if seq is not None and block:
        if seq > m.max_seq_len:
            out.append(f"data.seq_len={seq} exceeds model.max_seq_len={m.max_seq_len}")
        elif cp >= 1 and seq % (block * cp):
            out.append(f"data.seq_len={seq} is not a multiple of block size {block} x "
                       f"parallel.cp={cp} (each context-parallel rank holds whole blocks)")
    n_local = (seq or m.max_seq_len) // max(cp, 1)
    if cfg.parallel.sequence_parallel and tp >= 2 and n_local % tp:
        out.append(f"parallel.sequence_parallel=true splits each context-parallel rank's "
                   f"{n_local} tokens over parallel.tp={tp}: not a multiple")


def _check_choice(out, key, value, allowed) -> None:
    if value not in allowed:
        out.append(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")


def _check_at_least(out, key, value, low) -> None:
    if value < low:
        out.append(f"{key}={value} must be >= {low}")


def validate(cfg: Config) -> None:
    """Raise `ConfigError` listing every problem of `cfg` (nothing when it is runnable)."""
    out: list[str] = []
    _check_at_least(out, "parallel.tp", cfg.parallel.tp, 1)
    _check_at_least(out, "parallel.cp", cfg.parallel.cp, 1)
    if cfg.parallel.sequence_parallel and cfg.parallel.tp < 2:
        out.append(f"parallel.sequence_parallel=true shards the sequence over the TP group: "
                   f"it needs parallel.tp >= 2 (got tp={cfg.parallel.tp}; with tp=1 set "
                   "parallel.sequence_parallel=false)")
    _check_choice(out, "zero.stage", cfg.zero.stage, (0, 1, 2, 3))
    _check_choice(out, "zero.reduce_dtype", cfg.zero.reduce_dtype, ("fp32", "bf16"))
    _check_at_least(out, "zero.reduce_bucket_size", cfg.zero.reduce_bucket_size, 1)
    _check_at_least(out, "zero.allgather_bucket_size", cfg.zero.allgather_bucket_size, 1)
    _check_choice(out, "train.precision", cfg.train.precision, PRECISIONS)
    _check_choice(out, "schedule.kind", cfg.schedule.kind, SCHEDULES)
    _check_choice(out, "logging.wandb.mode", cfg.logging.wandb.mode, WANDB_MODES)
    _check_choice(out, "data.kind", cfg.data.kind, DATA_KINDS)
    if cfg.data.kind == "mqar":
        _check_at_least(out, "data.num_kv_pairs", cfg.data.num_kv_pairs, 1)
        if not isinstance(cfg.model, LMConfig):
            out.append("data.kind=mqar trains a language model (model.kind=lm)")
    _check_at_least(out, "train.steps", cfg.train.steps, 1)
    _check_at_least(out, "train.grad_accum", cfg.train.grad_accum, 1)
    _check_at_least(out, "train.max_nonfinite_steps", cfg.train.max_nonfinite_steps, 1)
    _check_at_least(out, "train.timeout_s", cfg.train.timeout_s, 0)
    _check_at_least(out, "checkpoint.interval", cfg.checkpoint.interval, 0)
    _check_at_least(out, "checkpoint.keep_last", cfg.checkpoint.keep_last, 1)
    _check_at_least(out, "logging.interval", cfg.logging.interval, 1)
    _check_at_least(out, "data.micro_batch_size", cfg.data.micro_batch_size, 1)
    _check_at_least(out, "data.workers", cfg.data.workers, 0)
    _check_at_least(out, "schedule.warmup_steps", cfg.schedule.warmup_steps, 0)
    if not 0.0 < cfg.schedule.decay_fraction <= 1.0:
        out.append(f"schedule.decay_fraction={cfg.schedule.decay_fraction} must be in (0, 1]")
    if not 0.0 <= cfg.schedule.min_lr_ratio <= 1.0:
        out.append(f"schedule.min_lr_ratio={cfg.schedule.min_lr_ratio} must be in [0, 1]")
    if cfg.optim.lr <= 0:
        out.append(f"optim.lr={cfg.optim.lr} must be > 0")
    if cfg.optim.mixing_lr_scale < 0:
        out.append(f"optim.mixing_lr_scale={cfg.optim.mixing_lr_scale} must be >= 0 (0 "
                   "freezes Mc)")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        out.append(f"optim.betas={list(cfg.optim.betas)} must be two numbers in [0, 1)")
    if cfg.init.optimizer not in INIT_OPTIMIZER:
        out.append(f"init.optimizer={cfg.init.optimizer!r} must be one of "
                   f"{', '.join(INIT_OPTIMIZER)}")
    elif cfg.init.optimizer == "carry" and cfg.init.weights.endswith(".safetensors"):
        out.append(f"init.optimizer='carry' with init.weights={cfg.init.weights!r}: a "
                   ".safetensors file holds no optimizer state; give a checkpoint folder (a "
                   "universal one for another layout: tools/convert_checkpoint.py "
                   "to-universal) as init.weights or resume=PATH, or init.optimizer=reset")
    if not cfg.resume:
        out.append("resume='' must be 'auto', 'none' or a checkpoint path")
    if isinstance(cfg.model, LMConfig):
        _check_lm(cfg.model, cfg, out)
    else:
        try:
            cfg.model.validate()
            cfg.model.check_parallel(cfg.parallel.tp, cfg.parallel.cp)
            n_local = cfg.model.num_tokens // cfg.parallel.cp
            if cfg.parallel.sequence_parallel and cfg.parallel.tp >= 2 \
                    and n_local % cfg.parallel.tp:
                out.append(f"parallel.sequence_parallel=true splits each context-parallel "
                           f"rank's {n_local} tokens over parallel.tp={cfg.parallel.tp}: "
                           "not a multiple")
        except ValueError as exc:
            out.append(str(exc))
    if out:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(out))
