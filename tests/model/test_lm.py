"""The MHLA language model on one process: shapes, decode equals the parallel forward,
generation, activation checkpointing, a falling loss, and the parameter count formula."""

import pytest
import torch

from mhla_dist.config import load_config
from mhla_dist.model.lm import MHLALanguageModel
from mhla_dist.model.lm_flops import lm_flops_per_token, lm_num_parameters
from mhla_dist.parallel import build_topology, destroy_topology
from tests.model.lm_helpers import build, tiny_lm_config, token_batch
from tests.numerics import rel_err


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    topo = build_topology()
    yield topo
    destroy_topology()


def test_forward_shapes_and_loss():
    model = build()
    tokens, targets = token_batch()
    assert model(tokens).shape == (2, 64, 50)
    total, count = model.loss(tokens, targets)
    assert count == 128 and torch.isfinite(total)
    # An untrained model predicts roughly uniformly: mean loss near log(vocab).
    assert abs(total.item() / count.item() - torch.log(torch.tensor(50.0)).item()) < 0.5


@pytest.mark.parametrize("overrides", [
    {}, {"softmax_layers": [1]}, {"rotary": False, "per_head_mixing": True},
    {"normalize": True, "rotary": False, "output_gate": False, "output_norm": False},
], ids=["mhla", "hybrid", "perhead-norope", "normalized"])
def test_decode_equals_parallel_forward(overrides):
    model = build(**overrides).eval()
    tokens, _ = token_batch(n=40)  # 5 blocks of 8: decoding crosses block boundaries
    full = model(tokens)
    for prompt in (1, 8, 13):
        stepped = model.decode_logits(tokens, prompt)
        assert rel_err(stepped, full) < 1e-10, f"prompt {prompt}"


def test_greedy_generation_follows_the_forward_argmax():
    model = build().eval()
    prompt, _ = token_batch(n=5)
    out = model.generate(prompt, 20, temperature=0)
    assert out.shape == (2, 25) and torch.equal(out[:, :5], prompt)
    logits = model(out[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), out[:, 5:])
    g = torch.Generator().manual_seed(1)
    sampled = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=g)
    assert sampled.shape == (2, 15) and int(sampled.max()) < 50
    with pytest.raises(ValueError, match=r"prompt 5 \+ 60 new tokens exceed model.max_seq_len=64"):
        model.generate(prompt, 60)


def test_activation_checkpointing_gives_the_same_gradients():
    tokens, targets = token_batch()
    grads = []
    for ckpt in (False, True):
        model = build(activation_checkpointing=ckpt).train()
        model.loss(tokens, targets)[0].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert rel_err(grads[1][name], g) < 1e-12, name


def test_loss_falls_when_fitting_one_batch():
    torch.manual_seed(0)
    model = MHLALanguageModel(tiny_lm_config())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens, targets = token_batch()
    losses = []
    for _ in range(40):
        total, count = model.loss(tokens, targets)
        loss = total / count
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "softmax_layers": [0]},
                                       {"per_head_mixing": True, "output_gate": False}])
def test_parameter_count_formula_matches_the_model(overrides):
    model = build(**overrides)
    assert lm_num_parameters(model.cfg) == model.num_parameters()


@pytest.mark.parametrize("name,target", [("125m", 125e6), ("350m", 350e6), ("1.3b", 1.3e9),
                                         ("7b", 7e9)])
def test_presets_are_within_5_percent_of_their_names(name, target):
    cfg = load_config(f"configs/lm/{name}.yaml").model
    assert abs(lm_num_parameters(cfg) / target - 1) < 0.05
    assert lm_flops_per_token(cfg) > 6 * lm_num_parameters(cfg) * 0.9


def test_tiny_preset_builds_on_cpu():
    cfg = load_config("configs/lm/tiny.yaml").model
    model = MHLALanguageModel(cfg)
    assert model.num_parameters() == lm_num_parameters(cfg)


@pytest.mark.parametrize("init", ["ones", "average"])
def test_mixing_init_ones_and_average_start_as_plain_linear_attention(init):
    """DESIGN §1's identity: Mc = ones is plain causal linear attention, i.e. one block.
    The row average only rescales each block's row, which the per-head output norm
    undoes (exactly without its eps): at initialisation the MHLA LM computes linear
    attention too."""
    model = build(mixing_init=init, rotary=False, norm_eps=0.0)
    one_block = build(block_size=64, rotary=False, norm_eps=0.0)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("mixing")}
    one_block.load_state_dict(state, strict=False)
    tokens, _ = token_batch(n=64)
    assert rel_err(model(tokens), one_block(tokens)) < 1e-6
    eye = build(mixing_init="identity", rotary=False, norm_eps=0.0)
    assert torch.equal(eye.layers[0].attn.mixing, torch.eye(8))
    eye.load_state_dict(state, strict=False)
    assert rel_err(eye(tokens), one_block(tokens)) > 1e-3  # block-local differs


def test_embed_init_std_sets_the_embedding_alone():
    model = build(tie_embeddings=False, embed_init_std=1.0, vocab_size=512)
    assert abs(model.embed.weight.std().item() - 1.0) < 0.05
    assert abs(model.head.weight.std().item() - model.cfg.init_std) < 0.005
    default = build(vocab_size=512)
    assert abs(default.embed.weight.std().item() - default.cfg.init_std) < 0.005
