"""The structured config of a run: one dataclass per section, omegaconf-typed.

The `model` section is one of several model configs, chosen by its `kind` key
(`lm` -> `LMConfig`, `dit` -> the DiT's config); the rest is fixed. Keys users and
scripts rely on: `run_dir`, `resume`, `train.steps`, `train.seed`, `checkpoint.interval`,
`checkpoint.keep_last`, `logging.wandb.mode`, `parallel.tp`, `parallel.cp`, `zero.stage`,
`init.weights`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .dit import DiTConfig


@dataclass
class LMConfig:
    """Decoder-only MHLA language model (causal)."""

    kind: str = "lm"
    vocab_size: int = 257  # byte-level: 256 bytes + end-of-document
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int | None = None  # default hidden_size // num_heads
    ffn_hidden_size: int | None = None  # default ~8/3 hidden, a multiple of 64
    max_seq_len: int = 256
    block_size: int | None = None  # tokens per MHLA block (default 64), or:
    num_blocks: int | None = None  # blocks per max_seq_len (long contexts bound M)
    feature_map: str = "relu"
    normalize: bool = False  # the output RMSNorm + gate take the denominator's place
    output_norm: bool = True
    output_gate: bool = True
    rotary: bool = False
    rope_theta: float = 10000.0
    # Rotary positions restart at every document when document masking is on (as
    # Megatron's THD and fla's varlen rotary do); attention is relative in the rotary
    # angle, so this changes only rounding, and keeps positions within what generation sees.
    rope_per_document: bool = True
    per_head_mixing: bool = False
    # Initial Mc: `average` (the causal row average, DESIGN §1), `identity` (block-local
    # linear attention) or `ones` (plain causal linear attention).
    mixing_init: str = "average"
    softmax_layers: list[int] = field(default_factory=list)  # hybrid: SDPA in these layers
    # The output norm and gate in the softmax layers too (false: those layers are plain
    # softmax attention, as an imported softmax model's).
    softmax_layer_extras: bool = True
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # The embedding's init std (default init_std; an untied head keeps init_std). MQAR
    # learns its recall only from an embedding of std about 1 (README, Evaluating).
    embed_init_std: float | None = None
    activation_checkpointing: bool = False
    # Tokens per chunk of the fused head + cross-entropy (default: 32 MiB of fp32 logits).
    loss_chunk_tokens: int | None = None


@dataclass
class ParallelConfig:
    tp: int = 1
    cp: int = 1  # data parallelism is what the world size leaves
    # Megatron-style: the residual stream between regions sharded over TP (needs tp > 1).
    sequence_parallel: bool = False


@dataclass
class DataConfig:
    kind: str = "text"  # text | video | mqar (generated on the fly: mhla_dist/eval/mqar.py)
    train: str = ""  # shard URLs: a path, a brace pattern, pipe:...
    eval: str = ""
    seq_len: int | None = None  # default model.max_seq_len
    micro_batch_size: int = 1
    workers: int = 0
    shuffle_buffer: int = 1000
    seed: int = 0
    num_kv_pairs: int = 8  # mqar: key-value pairs per sequence
    # Packed text: attention restarts at every document (the batch carries `cu_seqlens`)
    # and no target crosses a document boundary; false attends across documents.
    document_masking: bool = True


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.1
    # Parameters whose name contains one of these get no weight decay; 1-D parameters
    # (norm weights, biases) never get it (as in Megatron-LM). `mixing` is Mc.
    no_decay: list[str] = field(default_factory=lambda: ["mixing"])
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    # The Mc matrices' learning rate is lr times this (their own parameter group when it
    # is not 1; 0 freezes Mc at its init).
    mixing_lr_scale: float = 1.0


@dataclass
class ZeroConfig:
    stage: int = 0
    # DeepSpeed's zero_optimization options (stages 1-3), with its GPU recommendations:
    # gradient reduction overlapped with the backward, gradients copied into one buffer.
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000  # elements
    allgather_bucket_size: int = 500_000_000  # elements (stages 1-2)
    # Gradient reduction dtype (DeepSpeed's communication_data_type) of bf16 runs; fp32
    # runs always reduce in fp32.
    reduce_dtype: str = "fp32"  # fp32 | bf16


@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 0
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps decays
    min_lr_ratio: float = 0.1


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "mhla-dist"
    name: str | None = None


@dataclass
class LoggingConfig:
    interval: int = 10
    peak_flops: float = 0.0  # per device, for MFU; 0 leaves MFU out
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps; 0 saves only at the end
    keep_last: int = 3


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 0
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16
    eval_interval: int = 0
    eval_steps: int = 10
    max_nonfinite_steps: int = 5
    # A step (with its eval and save) running past this many seconds stops every rank,
    # with each thread's stack dumped; also the process groups' collective timeout.
    # 0: no step watchdog (collectives time out after 30 minutes).
    timeout_s: float = 1800.0


@dataclass
class InitConfig:
    """Start a run from saved weights at any DP x CP x TP layout; a checkpoint found by
    `resume` wins over `init.weights` (a restarted run continues)."""

    # "" builds the model from its random init; else a consolidated .safetensors file, a
    # trainer checkpoint folder, or a universal checkpoint folder (convert_checkpoint.py
    # to-universal)
    weights: str = ""
    # What happens to the optimizer state of `init.weights` or `resume`: carry | reset |
    # auto (carry when the source holds optimizer state, i.e. is a checkpoint folder;
    # reset for a .safetensors file)
    optimizer: str = "auto"


@dataclass
class Config:
    run_dir: str = "runs/default"
    resume: str = "auto"  # auto | none | a checkpoint path
    model: Any = field(default_factory=lambda: {"kind": "lm"})
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: InitConfig = field(default_factory=InitConfig)


# `model.kind` -> its config class.
MODEL_CONFIGS: dict[str, type] = {"lm": LMConfig, "dit": DiTConfig}
