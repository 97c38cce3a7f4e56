"""Captions reach the DiT in training, evaluation and sampling: two bf16 runs on the same
clips and seed with different caption embeddings end with different weights (before the
fix they were bit-identical: the loader was never asked for captions), the same captions
give the same weights, eval uses the captions undropped, and caption dropout zeroes whole
captions at `caption_dropout`'s rate."""

import torch

from tests.parallel.harness import run_ranks
from tests.train.runs import TINY_DIT_RUN, train_rank_fn

CAPTION_RUN = [*TINY_DIT_RUN, "model.num_classes=0", "model.caption_dim=8",
               "train.precision=bf16", "train.steps=3", "optim.lr=1e-2"]


def _clips(path, caption_seed):
    from mhla_dist.data import write_synthetic_video

    write_synthetic_video(path, num_clips=16, frames=8, size=16, clips_per_shard=8,
                          caption_dim=8, caption_seed=caption_seed)
    return f"data.train={path}"


def test_different_captions_train_different_weights(tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("a_again", 0), ("b", 1)):
        data = _clips(tmp_path / f"clips_{seed}", seed)
        runs[name] = run_ranks(train_rank_fn, 1, [f"run_dir={tmp_path / name}", data],
                               None, CAPTION_RUN)[0]["params"]
    assert all(torch.equal(p, runs["a_again"][n]) for n, p in runs["a"].items())
    differ = [n for n, p in runs["a"].items() if not torch.equal(p, runs["b"][n])]
    assert any(n.startswith("caption_embedder") for n in differ), differ


class _Engine:
    """What the DiT task needs of a DeepSpeed engine: the forward and `.module`."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args):
        return self.module(*args)


def test_the_task_feeds_captions_and_drops_them_in_training_only():
    from mhla_dist.config import load_config
    from mhla_dist.parallel import build_topology, destroy_topology
    from mhla_dist.train.dit_task import DiTTask
    from tests.model.dit_helpers import perturb

    cfg = load_config(None, [*CAPTION_RUN, "model.caption_dropout=0.99", "train.precision=fp32"])
    topo = build_topology()
    try:
        task = DiTTask(cfg, topo)
        model = task.build_model()
        perturb(model)  # adaLN-Zero would hide the caption at initialisation
        engine = _Engine(model)
        g = torch.Generator().manual_seed(0)
        clip = torch.randint(0, 256, (4, 8, 16, 16, 3), generator=g, dtype=torch.uint8)
        caption = torch.randn(4, 8, generator=g)

        def loss(caption, training):
            model.train(training)
            task.set_position(None if not training else 0, 0)
            return task.loss(engine, {"clip": clip, "caption": caption})[0].item()

        assert loss(caption, False) == loss(caption, False)  # eval draws are fixed
        assert loss(caption, False) != loss(caption * 2, False)  # eval drops no caption
        # caption_dropout=0.99: this step's draw drops every caption, so their values no
        # longer matter in training
        assert loss(caption, True) == loss(caption * 2, True)
        assert task.count({"clip": clip}) == 4 * cfg.model.num_tokens * cfg.model.patch_dim
    finally:
        destroy_topology()


def test_drop_captions_rate_and_shape():
    from mhla_dist.model.rectified_flow import drop_captions

    caption = torch.ones(10000, 4)
    out = drop_captions(caption, 0.25, torch.Generator().manual_seed(0))
    rows = out.sum(1)
    assert set(rows.unique().tolist()) == {0.0, 4.0}
    assert abs((rows == 0).float().mean().item() - 0.25) < 0.02
    assert torch.equal(drop_captions(caption, 0.0), caption)
