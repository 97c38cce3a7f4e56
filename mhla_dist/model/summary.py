"""What a model costs before it is built: parameters, FLOPs and memory per rank.

The model is built on the `meta` device (no memory) at TP = 1 to count and classify its
parameters (split over TP or replicated); the layout comes from the config.

Memory per rank, in bytes, for a training step with AdamW:
    weights:     P_rank x (4 fp32 | 2 bf16 + 4 fp32 master)
    gradients:   P_rank x 4
    optimizer:   P_rank x 8 (two fp32 moments)
    ZeRO over the DP x CP ranks: stage >= 1 divides the optimizer (and master weights),
    >= 2 the gradients, 3 the weights.
    activations: per layer and token, about 34 x hidden bytes at 2-byte activations
    (Korthikanti et al. 2022 without the attention-score term, which MHLA does not have),
    of which TP divides 24/34, and with sequence parallelism all of it (the norms'
    and residuals' 10/34 are then sharded over TP too); with activation checkpointing, the
    layer inputs (2 x hidden bytes per layer and token, divided by TP under sequence
    parallelism) plus one layer's full activations. Scaled by 2 for fp32.
P_rank = split parameters / TP + replicated ones. Tokens per rank = micro batch x
sequence / CP.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from mhla_dist.config import Config, LMConfig


@dataclass
class ModelSummary:
    kind: str
    parameters: int
    parameters_per_rank: int
    flops_per_token: float | None
    flops_per_sample: float | None
    tokens_per_sample: int
    memory_per_rank: dict[str, int]
    layout: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)


def build_on_meta(cfg: Config) -> torch.nn.Module:
    """The model of `cfg` at TP = CP = 1 on the meta device (needs a process group)."""
    from mhla_dist.parallel import build_topology

    build_topology()
    with torch.device("meta"):
        if isinstance(cfg.model, LMConfig):
            from .lm import MHLALanguageModel

            return MHLALanguageModel(cfg.model)
        from .video import build_dit

        return build_dit(cfg.model)


def _split_and_replicated(model: torch.nn.Module) -> tuple[int, int]:
    split = sum(p.numel() for p in model.parameters()
                if getattr(p, "tensor_model_parallel", False))
    total = sum(p.numel() for p in model.parameters())
    return split, total - split


def _flops(cfg: Config) -> tuple[float | None, float | None, int]:
    if isinstance(cfg.model, LMConfig):
        from .lm_flops import lm_flops_per_token

        seq = cfg.data.seq_len or cfg.model.max_seq_len
        per_token = lm_flops_per_token(cfg.model, seq)
        return per_token, per_token * seq, seq
    from .dit_cost import dit_flops_per_sample

    return None, dit_flops_per_sample(cfg.model), cfg.model.num_tokens


def _hidden_and_layers(model_cfg) -> tuple[int, int, bool]:
    layers = getattr(model_cfg, "num_layers", None) or model_cfg.depth
    return model_cfg.hidden_size, layers, bool(model_cfg.activation_checkpointing)


def summarize(cfg: Config, world_size: int | None = None) -> ModelSummary:
    tp, cp = cfg.parallel.tp, cfg.parallel.cp
    world = world_size or tp * cp
    if world % (tp * cp):
        raise ValueError(f"world size {world} is not a multiple of tp={tp} x cp={cp}")
    dp = world // (tp * cp)
    model = build_on_meta(cfg)
    split, replicated = _split_and_replicated(model)
    p_rank = split // tp + replicated
    per_token, per_sample, tokens = _flops(cfg)

    shards, stage = dp * cp, cfg.zero.stage
    bf16 = cfg.train.precision == "bf16"
    weights = p_rank * (2 if bf16 else 4)
    master = p_rank * 4 if bf16 else 0
    grads = p_rank * 4
    optim = p_rank * 8
    if stage >= 1:
        optim, master = optim // shards, master // shards
    if stage >= 2:
        grads //= shards
    if stage >= 3:
        weights //= shards
    hidden, layers, ckpt = _hidden_and_layers(cfg.model)
    tokens_rank = cfg.data.micro_batch_size * tokens // cp
    act_scale = 1 if bf16 else 2
    seq_shards = tp if cfg.parallel.sequence_parallel else 1
    per_layer = tokens_rank * hidden * (10 / seq_shards + 24 / tp) * act_scale
    activations = (layers * tokens_rank * hidden * 2 * act_scale / seq_shards + per_layer
                   if ckpt else layers * per_layer)
    memory = {"weights": weights, "master_weights": master, "gradients": grads,
              "optimizer": optim, "activations": int(activations)}
    memory["total"] = sum(memory.values())
    return ModelSummary(
        kind=cfg.model.kind, parameters=split + replicated, parameters_per_rank=p_rank,
        flops_per_token=per_token, flops_per_sample=per_sample, tokens_per_sample=tokens,
        memory_per_rank=memory, layout={"world": world, "dp": dp, "cp": cp, "tp": tp,
                                        "sequence_parallel": int(cfg.parallel.sequence_parallel),
                                        "zero_stage": stage},
    )
