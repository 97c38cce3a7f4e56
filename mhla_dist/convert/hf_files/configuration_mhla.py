"""transformers configuration of an MHLA language model exported by mhla-dist."""

from transformers import PretrainedConfig


class MHLAConfig(PretrainedConfig):
    model_type = "mhla_lm"

    def __init__(self, vocab_size=257, hidden_size=128, num_layers=2, num_heads=4,
                 head_dim=32, ffn_hidden_size=384, max_seq_len=256, block_size=64,
                 feature_map="relu", normalize=False, output_norm=True, output_gate=True,
                 rotary=False, rope_theta=10000.0, per_head_mixing=False, softmax_layers=(),
                 softmax_layer_extras=True, tie_embeddings=True, norm_eps=1e-6, **kwargs):
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers
        self.num_heads, self.head_dim, self.ffn_hidden_size = num_heads, head_dim, ffn_hidden_size
        self.max_seq_len, self.block_size, self.feature_map = max_seq_len, block_size, feature_map
        self.normalize, self.output_norm, self.output_gate = normalize, output_norm, output_gate
        self.rotary, self.rope_theta, self.per_head_mixing = rotary, rope_theta, per_head_mixing
        self.softmax_layers, self.softmax_layer_extras = list(softmax_layers), softmax_layer_extras
        self.tie_embeddings, self.norm_eps = tie_embeddings, norm_eps
        self.max_position_embeddings = max_seq_len
        self.num_hidden_layers = num_layers
        kwargs.setdefault("tie_word_embeddings", False)  # the head reads the embedding itself
        super().__init__(**kwargs)
