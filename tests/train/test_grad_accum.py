"""Gradient accumulation optimises the token mean over the whole step: two micro-batches
with different padding give the step of one batch holding the same windows (before the
fix each micro-batch was weighted by its own token count)."""

from tests.parallel.harness import run_ranks
from tests.train.runs import corpus, losses, train_rank_fn

# Windows (in stream order) whose index % 4 is 0 or 1 keep only their first 8 targets.
PADDED, KEEP = (0, 1), 8


class _PaddedWindows:
    """The train loader with the tails of some windows turned into padding (doc id -1,
    which `shift_tokens` makes ignore_index), by their position in the stream."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        seen = 0
        for batch in self.loader:
            doc_ids = batch["doc_ids"].clone()
            for row in range(doc_ids.shape[0]):
                if (seen + row) % 4 in PADDED:
                    doc_ids[row, KEEP + 1:] = -1
            seen += doc_ids.shape[0]
            yield {**batch, "doc_ids": doc_ids}

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _pad(trainer):
    trainer.train_loader = _PaddedWindows(trainer.train_loader)


def test_micro_batches_of_different_padding_give_the_large_batch_step(tmp_path):
    data = corpus(tmp_path) + ["optim.eps=1e-3"]  # eps: see test_trainer's GA test
    big = run_ranks(train_rank_fn, 1, [f"run_dir={tmp_path / 'big'}", "train.steps=3",
                                       "data.micro_batch_size=4", *data], _pad)[0]
    acc = run_ranks(train_rank_fn, 1, [f"run_dir={tmp_path / 'acc'}", "train.steps=3",
                                       "data.micro_batch_size=2", "train.grad_accum=2",
                                       *data], _pad)[0]
    for a, b in zip(losses(acc), losses(big), strict=True):
        assert abs(a - b) <= 1e-5 * b, (losses(acc), losses(big))
    for name, p in big["params"].items():
        assert (acc["params"][name] - p).abs().max() <= 1e-5, name
