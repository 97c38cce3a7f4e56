"""The MHLA language model: decoder-only, pre-norm, causal MHLA (or SDPA in chosen layers).

    tokens -> embedding -> [RMSNorm -> attention -> + -> RMSNorm -> SwiGLU -> +] x L
           -> RMSNorm -> head (tied to the embedding or not) -> logits

Attention is MHLA with the feature map, optionally a rotary embedding, the per-head output
RMSNorm and the SiLU output gate the authors use for language models, and `Mc` initialised
to the causal row average over `max_seq_len / block_size` blocks. Heads are split over TP,
tokens over CP (each rank feeds its contiguous slice of the sequence). Generation decodes
one token at a time with the recurrent state, equal to the parallel forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mhla_dist.config import LMConfig, resolve_lm
from mhla_dist.parallel.collectives import copy_to_group, gather_from_group
from mhla_dist.parallel.documents import PackedDocuments
from mhla_dist.parallel.softmax_attention import ParallelSoftmaxAttention
from mhla_dist.parallel.tp_layers import (
    ParallelMHLAttention,
    ParallelSwiGLU,
    sequence_shard_check,
)
from mhla_dist.parallel.vocab_parallel import VocabParallelEmbedding, VocabParallelHead
from mhla_kernels import causal_mixing

from .layers import RMSNorm
from .linear_cross_entropy import linear_cross_entropy


def token_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
    """`(sum of token cross-entropies, number of target tokens)`, in float32 at least."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum",
                            ignore_index=ignore_index)
    return total, (targets != ignore_index).sum()


def initial_mixing(kind: str, num_blocks: int) -> torch.Tensor:
    """The LM's initial `Mc` (`model.mixing_init`): the causal row average (DESIGN §1),
    the identity (block-local linear attention) or all ones (plain linear attention)."""
    if kind == "average":
        return causal_mixing(num_blocks)
    if kind == "identity":
        return torch.eye(num_blocks)
    if kind == "ones":
        return torch.ones(num_blocks, num_blocks).tril()
    raise ValueError(f"model.mixing_init={kind!r} is not one of average, identity, ones")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig, index: int, *, tp_group=None, cp_group=None,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        sp = sequence_parallel
        common = dict(output_gate=cfg.output_gate, output_norm=cfg.output_norm,
                      norm_eps=cfg.norm_eps, rotary_theta=cfg.rope_theta if cfg.rotary else None,
                      tp_group=tp_group, cp_group=cp_group, sequence_parallel=sp)
        if index in cfg.softmax_layers:
            if not cfg.softmax_layer_extras:
                common.update(output_gate=False, output_norm=False)
            self.attn = ParallelSoftmaxAttention(cfg.hidden_size, cfg.num_heads, cfg.head_dim,
                                                 causal=True, **common)
        else:
            self.attn = ParallelMHLAttention(
                cfg.hidden_size, cfg.num_heads, cfg.head_dim, block_size=cfg.block_size,
                max_blocks=cfg.num_blocks, causal=True, feature=cfg.feature_map,
                normalize=cfg.normalize, per_head_mixing=cfg.per_head_mixing,
                mixing_init=initial_mixing(cfg.mixing_init, cfg.num_blocks), **common)
        self.rope_per_document = cfg.rotary and cfg.rope_per_document
        norm_group = tp_group if sp else None
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, grad_group=norm_group)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, grad_group=norm_group)
        self.mlp = ParallelSwiGLU(cfg.hidden_size, cfg.ffn_hidden_size, tp_group=tp_group,
                                  sequence_parallel=sp)

    def forward(self, x: torch.Tensor, docs: PackedDocuments | None = None) -> torch.Tensor:
        """`docs`: the packed documents of the batch (attention restarts at each one)."""
        h = self.attn_norm(x)
        if docs is None:
            h = self.attn(h)
        else:
            positions = docs.positions if self.rope_per_document else None
            mhla = isinstance(self.attn, ParallelMHLAttention)
            h = self.attn(h, docs.layout(self.attn.block_size) if mhla else docs.cu_seqlens,
                          positions)
        x = x + h
        return x + self.mlp(self.mlp_norm(x))

    def prefill(self, x: torch.Tensor):
        h, state = self.attn.prefill(self.attn_norm(x))
        x = x + h
        return x + self.mlp(self.mlp_norm(x), sequence_parallel=False), state

    def step(self, x: torch.Tensor, state) -> torch.Tensor:
        x = x + self.attn.step(self.attn_norm(x), state)
        return x + self.mlp(self.mlp_norm(x), sequence_parallel=False)


class MHLALanguageModel(nn.Module):
    """Causal LM over this rank's token slice `[B, N_local]` -> logits `[B, N_local, V]`.

    The embedding and the head are vocab-parallel over TP (each rank holds `1/TP` of the
    vocabulary rows, padded to a multiple of TP: `parallel/vocab_parallel.py`); the final
    norm is replicated (it sees the same all-reduced hidden states on every TP rank).

    `sequence_parallel` (TP > 1): between the regions the residual stream is this TP
    rank's `[B, N_local / TP, hidden]` shard (`parallel/tp_layers.py`): the embedding
    reduce-scatters its partial lookups, the norms run on the shard, and the head gathers
    the normed shards back. Parameters and their full gradients are as without it.
    """

    def __init__(self, cfg: LMConfig, *, tp_group=None, cp_group=None,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        self.cfg = cfg = resolve_lm(cfg)
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size,
                                            init_std=cfg.embed_init_std, tp_group=tp_group)
        sp = self.sequence_parallel = sequence_parallel and self.embed.tp > 1
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp_group=tp_group, cp_group=cp_group,
                                                 sequence_parallel=sp)
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps,
                            grad_group=self.embed.tp_group if sp else None)
        self.head = None
        if not cfg.tie_embeddings:
            self.head = VocabParallelHead(cfg.vocab_size, cfg.hidden_size,
                                          init_std=cfg.init_std, tp_group=tp_group)

    def _vocab(self):
        """The module holding the head's rows (the embedding when tied)."""
        return self.embed if self.head is None else self.head

    def head_input(self, h: torch.Tensor, sharded: bool) -> torch.Tensor:
        """The normed hidden states the vocab-parallel head multiplies: the whole sequence
        on every TP rank, its gradient summed over TP (each rank's rows give part of it)."""
        vocab, x = self._vocab(), self.norm(h)
        if sharded:
            return gather_from_group(x, 1, vocab.tp_group)
        return copy_to_group(x, vocab.tp_group)

    def logits(self, h: torch.Tensor, sharded: bool = False) -> torch.Tensor:
        """Full `[..., V]` logits of hidden states (gathered over TP); `sharded`: `h` is
        this rank's sequence-parallel shard."""
        vocab = self._vocab()
        return vocab.full_logits(F.linear(self.head_input(h, sharded), vocab.weight))

    def documents(self, tokens: torch.Tensor, cu_seqlens) -> PackedDocuments | None:
        """The packed documents of `tokens` (this CP rank's `[B, N_local]`) at the global
        offsets `cu_seqlens` (over the flattened `B * N` tokens), or None."""
        if cu_seqlens is None:
            return None
        rank, cp = self.layers[0].attn.cp_rank_size()
        return PackedDocuments(cu_seqlens, tokens.shape[0], tokens.shape[1], cp_rank=rank,
                               cp_size=cp, device=tokens.device)

    def hidden_states(self, tokens: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        """The last layer's output (before the final norm) `[B, N_local, hidden]`, or under
        sequence parallelism this TP rank's `[B, N_local / TP, hidden]` shard.
        `cu_seqlens`: packed documents (global offsets): attention restarts at each."""
        if self.sequence_parallel:
            sequence_shard_check(tokens.shape[1], self.embed.tp)
        docs = self.documents(tokens, cu_seqlens)
        h = self.embed(tokens, scatter=self.sequence_parallel)
        for layer in self.layers:
            if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, docs, use_reentrant=False)
            else:
                h = layer(h, docs)
        return h

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                ignore_index: int = -100, cu_seqlens=None):
        """Logits `[B, N_local, V]`; with `targets`, the loss `(sum, count)` instead, by
        the chunked head + cross-entropy that never holds the logits (`loss`).
        `cu_seqlens`: packed documents, global offsets over the flattened `B * N` tokens
        (what the data loader emits): every document is modelled alone."""
        h, sp = self.hidden_states(tokens, cu_seqlens), self.sequence_parallel
        if targets is None:
            return self.logits(h, sp)
        vocab = self._vocab()
        return linear_cross_entropy(self.head_input(h, sp), vocab.weight, targets,
                                    ignore_index=ignore_index,
                                    chunk_tokens=self.cfg.loss_chunk_tokens,
                                    tp_group=vocab.tp_group if vocab.tp > 1 else None,
                                    vocab_size=self.cfg.vocab_size, reduce_hidden_grad=False)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
             cu_seqlens=None):
        """`(sum of token cross-entropies, number of target tokens)` on this rank: the
        trainer divides by the global count (DESIGN §2). Equal to `token_loss` of the
        logits, without holding them."""
        return self(tokens, targets, ignore_index, cu_seqlens)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def decode_logits(self, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """Logits of every position: the prompt by a parallel prefill, the rest one token
        at a time with the recurrent states (what `generate` does, teacher-forced)."""
        h = self.embed(tokens[:, :prompt_len])
        states = []
        for layer in self.layers:
            h, state = layer.prefill(h)
            states.append(state)
        out = [self.logits(h)]
        for t in range(prompt_len, tokens.shape[1]):
            h = self.embed(tokens[:, t:t + 1])
            for layer, state in zip(self.layers, states, strict=True):
                h = layer.step(h, state)
            out.append(self.logits(h))
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None):
        """Sample `max_new_tokens` after `prompt` `[B, P]` (P >= 1); temperature 0 is greedy."""
        limit = self.cfg.max_seq_len
        if prompt.shape[1] + max_new_tokens > limit:
            raise ValueError(f"prompt {prompt.shape[1]} + {max_new_tokens} new tokens exceed "
                             f"model.max_seq_len={limit}")
        h = self.embed(prompt)
        states = []
        for layer in self.layers:
            h, state = layer.prefill(h)
            states.append(state)
        tokens = [prompt]
        logits = self.logits(h[:, -1:])
        for _ in range(max_new_tokens):
            nxt = _sample(logits[:, -1].float(), temperature, top_k, generator)
            tokens.append(nxt)
            h = self.embed(nxt)
            for layer, state in zip(self.layers, states, strict=True):
                h = layer.step(h, state)
            logits = self.logits(h)
        return torch.cat(tokens, dim=1)


def _sample(logits, temperature, top_k, generator):
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)
