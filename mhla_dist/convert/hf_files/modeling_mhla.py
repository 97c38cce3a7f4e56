"""transformers modeling code of an MHLA language model exported by mhla-dist.

Self-contained (torch and transformers only). Multi-Head Linear Attention (Zhang et al.,
arXiv 2601.07832), causal: the tokens form blocks of `block_size`; block `i` reads the
summaries `S_b = sum_s phi(k_s) v_s^T` of the blocks before it mixed by the learned
`Mc[i, b]`, and its own tokens causally weighted by `Mc[i, i]`. Computed blockwise, so the
cost is linear in the sequence length. Layers listed in `softmax_layers` are softmax
attention. Weight names are those of mhla-dist's checkpoints.

`generate()` decodes with a recurrent state per layer (`MHLAState`: the finished block
summaries, the running summary of the current block and the mixed prefix of that block,
so a token costs O(d^2) per head; softmax layers keep their keys and values), equal to
the parallel forward token for token.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

try:
    from .configuration_mhla import MHLAConfig
except ImportError:  # loaded as a plain module
    from configuration_mhla import MHLAConfig


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.to(x32.dtype)).to(x.dtype)


def rotate(x, theta, start=0):
    """NeoX-style rotary embedding of `x` `[B, N, H, d]` at positions start..start+N-1."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    positions = torch.arange(start, start + x.shape[1], dtype=torch.float64, device=x.device)
    angles = positions[:, None] * freqs
    cos, sin = (f(angles).to(x.dtype)[None, :, None, :] for f in (torch.cos, torch.sin))
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def causal_mhla(q, k, v, mixing, block_size, normalize, eps=1e-6):
    """Causal MHLA of features `q`, `k` `[B, N, H, d]` and values `v` `[B, N, H, dv]`."""
    b, n, h, d = q.shape
    c, m = block_size, -(-n // block_size)
    dtype = torch.promote_types(q.dtype, torch.float32)
    pad = m * c - n
    q, k, v = (F.pad(t.to(dtype), (0, 0, 0, 0, 0, pad)).view(b, m, c, h, -1)
               for t in (q, k, v))  # padding after the feature map contributes nothing
    mc = mixing[..., :m, :m].to(dtype)
    mc = mc[None] if mc.dim() == 2 else mc  # [1 or H, M, M]
    strict = torch.tril(mc, -1)
    diag = torch.diagonal(mc, dim1=-2, dim2=-1)  # [1 or H, M]
    summaries = torch.einsum("bmchd,bmche->bmhde", k, v)
    mixed = torch.einsum("hij,bjhde->bihde", strict, summaries)
    scores = torch.einsum("bichd,bishd->bihcs", q, k)
    scores = scores * torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    scores = scores * diag.t()[None, :, :, None, None]
    num = torch.einsum("bichd,bihde->biche", q, mixed) + torch.einsum(
        "bihcs,bishe->biche", scores, v)
    if normalize:
        mixed_z = torch.einsum("hij,bjhd->bihd", strict, k.sum(2))
        den = torch.einsum("bichd,bihd->bich", q, mixed_z) + scores.sum(-1).transpose(2, 3)
        out = num / (den[..., None] + eps)
    else:
        out = num * d**-0.5
    return out.reshape(b, m * c, h, -1)[:, :n]


class Attention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        width = config.num_heads * config.head_dim
        self.softmax = layer in config.softmax_layers
        extras = not self.softmax or config.softmax_layer_extras
        self.heads, self.head_dim, self.config = config.num_heads, config.head_dim, config
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(config.hidden_size, width, bias=False)
                                                 for _ in range(3))
        self.o_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.gate_proj = (nn.Linear(config.hidden_size, width, bias=False)
                          if config.output_gate and extras else None)
        self.out_norm = (nn.Parameter(torch.ones(config.head_dim))
                         if config.output_norm and extras else None)
        if not self.softmax:
            blocks = config.max_seq_len // config.block_size
            shape = (config.num_heads,) * config.per_head_mixing + (blocks, blocks)
            self.mixing = nn.Parameter(torch.zeros(shape))

    def phi(self, x):
        name = self.config.feature_map
        if name == "identity":
            return x
        return F.elu(x) + 1 if name == "elu" else torch.relu(x) + 1e-6

    def mixing_used(self):
        return self.mixing.clamp(min=0) if self.config.normalize else self.mixing

    def forward(self, x, state=None):
        """`x` `[B, N, hidden]`: the whole sequence (`state` None), its prompt (`state` a
        fresh `LayerState`, filled for decoding) or the next tokens after `state`."""
        b, n, _ = x.shape
        cfg, start = self.config, 0 if state is None else state.position
        q, k, v = (p(x).view(b, n, self.heads, self.head_dim)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        if not self.softmax:
            q, k = self.phi(q), self.phi(k)
        if cfg.rotary:
            q, k = rotate(q, cfg.rope_theta, start), rotate(k, cfg.rope_theta, start)
        if self.softmax:
            if state is not None and start > 0:
                k, v = torch.cat([state.k, k], 1), torch.cat([state.v, v], 1)
            if state is not None:
                state.k, state.v = k, v
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=start == 0)
            o = o.transpose(1, 2)
        elif state is not None and start > 0:
            o = torch.cat([state.step(q[:, i], k[:, i], v[:, i], self.mixing_used())
                           for i in range(n)], 1).to(v.dtype)
        else:
            o = causal_mhla(q, k, v, self.mixing_used(), cfg.block_size,
                            cfg.normalize).to(v.dtype)
            if state is not None:
                state.prefill(k, v, self.mixing_used())
        if state is not None:
            state.position = start + n
        if self.out_norm is not None:
            o32 = o.to(torch.promote_types(o.dtype, torch.float32))
            o32 = o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
            o = (o32 * self.out_norm.to(o32.dtype)).to(o.dtype)
        o = o.reshape(b, n, -1)
        if self.gate_proj is not None:
            o = o * F.silu(self.gate_proj(x))
        return self.o_proj(o)


class LayerState:
    """One layer's decode state: softmax keys/values, or MHLA's block summaries."""

    def __init__(self, block_size, normalize, eps=1e-6):
        self.block_size, self.normalize, self.eps = block_size, normalize, eps
        self.position, self.k, self.v = 0, None, None
        self.blocks, self.block_z = [], []  # finished blocks' S [B, H, d, dv], z [B, H, d]
        self.running = self.running_z = self.prefix = self.prefix_z = None

    def _mix_prefix(self, i, mixing):
        """P_i = sum_{b<i} Mc[i, b] S_b (and y_i), once per block."""
        mc = mixing if mixing.dim() == 3 else mixing[None]  # [1 or H, M, M]
        row = mc[:, i, :i].to(self.running.dtype)  # [1 or H, i]
        if i == 0:
            self.prefix = torch.zeros_like(self.running)
            self.prefix_z = torch.zeros_like(self.running_z)
            return
        stack, zs = torch.stack(self.blocks, 1), torch.stack(self.block_z, 1)  # [B, i, H, ...]
        self.prefix = torch.einsum("hj,bjhde->bhde", row, stack)
        self.prefix_z = torch.einsum("hj,bjhd->bhd", row, zs)

    def prefill(self, k, v, mixing):
        b, n, h, d = k.shape
        c, dtype = self.block_size, torch.promote_types(k.dtype, torch.float32)
        k, v = k.to(dtype), v.to(dtype)
        last = (n - 1) // c
        for j in range(last + 1):
            kb, vb = k[:, j * c:(j + 1) * c], v[:, j * c:(j + 1) * c]
            s, z = torch.einsum("bchd,bche->bhde", kb, vb), kb.sum(1)
            if j < last:
                self.blocks.append(s)
                self.block_z.append(z)
            else:
                self.running, self.running_z = s, z
        self._mix_prefix(last, mixing)

    def step(self, q, k, v, mixing):
        """One token per sequence (`[B, H, d]`) at `self.position`; returns `[B, 1, H, dv]`."""
        t, c = self.position, self.block_size
        dtype = self.running.dtype
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        i = t // c
        if t % c == 0:  # a new block: the running one is finished
            self.blocks.append(self.running)
            self.block_z.append(self.running_z)
            self.running = torch.zeros_like(self.running)
            self.running_z = torch.zeros_like(self.running_z)
            self._mix_prefix(i, mixing)
        self.running = self.running + torch.einsum("bhd,bhe->bhde", k, v)
        self.running_z = self.running_z + k
        mc = mixing if mixing.dim() == 3 else mixing[None]
        diag = mc[:, i, i].to(dtype)[None, :, None]  # [1, 1 or H, 1]
        num = torch.einsum("bhd,bhde->bhe", q, self.prefix) + diag * torch.einsum(
            "bhd,bhde->bhe", q, self.running)
        if self.normalize:
            den = (q * self.prefix_z).sum(-1) + diag[..., 0] * (q * self.running_z).sum(-1)
            out = num / (den[..., None] + self.eps)
        else:
            out = num * q.shape[-1] ** -0.5
        self.position = t + 1
        return out[:, None]


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, f = config.hidden_size, config.ffn_hidden_size
        self.gate_proj, self.up_proj = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, state=None):
        x = x + self.attn(self.attn_norm(x), state)
        return x + self.mlp(self.mlp_norm(x))


class MHLACache:
    """The decode state of every layer (what `generate()` carries between steps)."""

    def __init__(self, config):
        self.layers = [LayerState(config.block_size, config.normalize)
                       for _ in range(config.num_layers)]

    @property
    def position(self):
        return self.layers[0].position


@dataclass
class MHLAOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: MHLACache | None = None


class MHLAForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MHLAConfig
    base_model_prefix = ""
    _no_split_modules = ["DecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.head = (None if config.tie_embeddings else
                     nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def get_input_embeddings(self):
        return self.embed

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # the decode state is MHLACache, made by forward

    def forward(self, input_ids, attention_mask=None, labels=None, cache=None, use_cache=None,
                **kwargs):
        """Logits of `input_ids` `[B, N]`; with `use_cache` the decode state comes back as
        `cache`, and with a `cache` the ids are the tokens after its position."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported: MHLA has no attention mask "
                             "(give sequences of equal length, or one at a time)")
        if cache is None and use_cache:
            cache = MHLACache(self.config)
        start = 0 if cache is None else cache.position
        if start + input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"{start + input_ids.shape[1]} tokens exceed max_seq_len="
                             f"{self.config.max_seq_len} (the model's Mc has that many blocks)")
        h = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, None if cache is None else cache.layers[i])
        weight = self.embed.weight if self.head is None else self.head.weight
        logits = F.linear(self.norm(h), weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten(), ignore_index=-100)
        return MHLAOutput(loss=loss, logits=logits, cache=cache)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, cache=None,
                                      use_cache=None, **kwargs):
        if cache is not None:  # the state holds the prefix: feed the new tokens only
            return {"input_ids": input_ids[:, cache.position:], "cache": cache,
                    "use_cache": True}
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "use_cache": use_cache}

