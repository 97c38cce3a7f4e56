"""Loss as a function of context length: the mean next-token loss per position bucket.

The windows are what the LM loader packs from held-out shards (`lm_loader`, in shard order,
one epoch). Two ways to count a token's position:

- plain (`per_document=False`): windows of packed text without document masking; input
  position `t` of a window sees the `t + 1` real tokens before its target, whatever
  documents they belong to, so bucket `b` (positions `[b * bucket, (b + 1) * bucket)`)
  is the loss at that much context.
- per document (`per_document=True`): the windows as the trainer's default
  `data.document_masking=true` sees them (`shift_tokens(..., document_masking=True)`,
  the model restarts at every document of `cu_seqlens`); a token's position is its place
  in its document (`mhla_kernels.document_positions`). A document cut by a window start
  restarts there, as it does for the model: the position is the context the model had.

Per-token losses come from the logits of a row at a time (never `[B, N, V]` at once),
accumulated in float64; the bucket sums add up to the overall sum (`model.loss` of the
same windows).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mhla_dist.data import IGNORE_INDEX, lm_loader, shift_tokens
from mhla_kernels import document_positions

log = logging.getLogger(__name__)


def check_perplexity(*, bucket: int, seq_len: int, max_seq_len: int, batches: int) -> None:
    """Raise `ValueError` naming every bad setting."""
    bad = []
    if bucket < 1:
        bad.append(f"bucket={bucket} must be >= 1 token")
    if not 1 <= seq_len <= max_seq_len:
        bad.append(f"seq_len={seq_len} must be in [1, model.max_seq_len={max_seq_len}]")
    if batches < 1:
        bad.append(f"batches={batches} must be >= 1")
    if bad:
        raise ValueError("; ".join(bad))


def held_out_batches(urls: str | Sequence[str], *, seq_len: int, batch_size: int,
                     vocab_size: int | None = None):
    """The held-out windows in a fixed order (no shuffling, one pass over the shards)."""
    return lm_loader(urls, seq_len=seq_len, batch_size=batch_size, shuffle=False,
                     num_epochs=1, vocab_size=vocab_size)


def window_positions(batch: dict[str, torch.Tensor], per_document: bool) -> torch.Tensor:
    """`[B, N]` position of every input token: its column, or (per document, from the
    shifted batch's `cu_seqlens`) its place in its document."""
    B, N = batch["input_ids"].shape
    if per_document:
        return document_positions(batch["cu_seqlens"]).view(B, N)
    return torch.arange(N).expand(B, N)


@torch.no_grad()
def token_losses(model, input_ids: torch.Tensor, labels: torch.Tensor,
                 cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """`[B, N]` float32 cross-entropy of every target (0 where ignored)."""
    h = model.hidden_states(input_ids, cu_seqlens)
    out = torch.zeros(labels.shape, dtype=torch.float32)
    for row in range(h.shape[0]):
        logits = model.logits(h[row:row + 1]).float()[0]
        out[row] = F.cross_entropy(logits, labels[row].to(logits.device), reduction="none",
                                   ignore_index=IGNORE_INDEX).cpu()
    return out


@torch.no_grad()
def perplexity_by_position(model, batches: Iterable[dict[str, torch.Tensor]], *,
                           seq_len: int, bucket: int = 64, per_document: bool = False,
                           max_batches: int = 8, device: str | torch.device = "cpu"
                           ) -> dict[str, Any]:
    """Mean loss, perplexity and target-token count per position bucket of `seq_len`-token
    windows (`batches`: unshifted loader batches `{"tokens", "doc_ids"}`), over at most
    `max_batches` batches, and overall. `model` is put in eval mode on `device`."""
    check_perplexity(bucket=bucket, seq_len=seq_len, max_seq_len=model.cfg.max_seq_len,
                     batches=max_batches)
    model.to(device).eval()
    num = math.ceil(seq_len / bucket)
    sums = torch.zeros(num, dtype=torch.float64)
    counts = torch.zeros(num, dtype=torch.int64)
    seen = 0
    for batch in batches:
        if seen == max_batches:
            break
        width = batch["tokens"].shape[1] - 1
        if width != seq_len:
            raise ValueError(f"a batch of {width}-token windows; expected seq_len={seq_len}")
        b = shift_tokens(batch, IGNORE_INDEX, document_masking=per_document)
        cu = b.get("cu_seqlens")
        losses = token_losses(model, b["input_ids"].to(device), b["labels"], cu)
        keep = b["labels"] != IGNORE_INDEX
        index = window_positions(b, per_document)[keep] // bucket
        sums += torch.bincount(index, losses[keep].double(), minlength=num)
        counts += torch.bincount(index, minlength=num)
        seen += 1
    if seen == 0:
        raise ValueError("the held-out data gave no batch (empty shards?)")
    if seen < max_batches:
        log.warning("the held-out data ran out after %d of %d batches", seen, max_batches)
    total, tokens = float(sums.sum()), int(counts.sum())
    rows = []
    for i in range(num):
        n = int(counts[i])
        loss = float(sums[i]) / n if n else None
        rows.append({"start": i * bucket, "stop": min((i + 1) * bucket, seq_len), "tokens": n,
                     "loss": loss, "perplexity": math.exp(loss) if n else None})
    mean = total / tokens if tokens else float("nan")
    return {"seq_len": seq_len, "bucket": bucket, "per_document": per_document,
            "batches": seen, "tokens": tokens, "loss": mean, "perplexity": math.exp(mean),
            "buckets": rows}


def perplexity_table(result: dict[str, Any]) -> str:
    """The result as a text table (one row per bucket, then the overall mean)."""
    mode = "per document" if result["per_document"] else "plain packed windows"
    head = f"{'positions':>13}{'tokens':>10}{'loss':>9}{'ppl':>10}"
    lines = [f"loss by position ({mode}, seq_len {result['seq_len']}, {result['batches']} "
             f"batches)", head, "-" * len(head)]
    for r in result["buckets"]:
        span = f"{r['start']}-{r['stop'] - 1}"
        if r["tokens"]:
            lines.append(f"{span:>13}{r['tokens']:>10}{r['loss']:>9.4f}{r['perplexity']:>10.2f}")
        else:
            lines.append(f"{span:>13}{0:>10}{'-':>9}{'-':>10}")
    lines.append(f"{'all':>13}{result['tokens']:>10}{result['loss']:>9.4f}"
                 f"{result['perplexity']:>10.2f}")
    return "\n".join(lines)
