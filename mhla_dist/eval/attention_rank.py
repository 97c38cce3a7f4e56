"""The paper's diagnostic of global context collapse: rank and row entropy of the
token-level attention matrix of a trained LM's layers, MHLA against plain linear attention
on the same features.

Linear attention applies `A = phi(Q) phi(K)^T` (rows normalised): rank at most `d`, and with
many tokens rows that flatten towards uniform. MHLA applies
`A[t, s] = Mc[blk(t), blk(s)] * phi(q_t).phi(k_s)` (DESIGN §1; causal: `s <= t`), whose rank
reaches `M d` and whose rows are sharper. For one head:

- `mhla_matrix(q, k, mixing, block_size)` builds `A` (`mixing = ones` is linear attention),
  `softmax_matrix(q, k)` the softmax reference, and `operator_matrix` what the operator
  applies to `v`: `A / (A 1 + eps)` when `normalize=True`, `scale * A` when not
  (`operator_matrix(A) @ v == mhla_reference`).
- `matrix_stats` measures that operator matrix: the numerical rank (singular values above
  `tol * s_max`), Roy & Vetterli's effective rank `exp(H(s / sum s))`, and the mean entropy
  (nats) of its rows made distributions by `|row| / sum |row|` (for `normalize=True` the
  rows already are; `normalize=False` rows may be signed, hence `|.|`), beside the
  uniform-row maximum `log(t + 1)` of causal row `t` and their per-row ratio. Row 0 (one
  entry, maximum 0) is left out of the ratio, and rows of zero mass out of the entropies.
  Scaling a matrix changes neither rank, so `scale` does not matter. Scaling its rows
  changes the effective rank: `effective_rank_rows` is that of the rows scaled to unit
  `|.|`-mass, which for `normalize=False` is the fairer comparison when the layer's
  per-token output RMSNorm cancels each row's scale anyway (for `normalize=True` it is
  `effective_rank`, up to `eps`).

Note that the causal mask lifts the rank bound: `tril(Q K^T)` of a rank-`d` product is in
general of full rank, so in a causal LM linear attention's numerical rank can reach `N`;
the effective rank and the entropy ratio are the telling numbers there.

`analyse_run` loads a run directory (`config.yaml` + `model.safetensors`, as
`tools/generate.py` does), captures the feature-mapped `q, k` of the chosen layers (the
instance's `ParallelMHLAttention.features`, or a softmax layer's rotated `q, k`) on token
windows, and returns one row per layer, head and kind (`mhla`, `linear`, `softmax`),
averaged over the windows. Each window runs as one sequence: data windows that cross a
document boundary are skipped when the run trains with `data.document_masking` (the model
never attended across documents), padded windows always.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KINDS = ("mhla", "linear", "softmax")
METRICS = ("rank", "effective_rank", "effective_rank_rows", "row_entropy", "max_entropy",
           "entropy_ratio")


# -- the matrices (one head: q, k [N, d]) ----------------------------------------------------

def mhla_matrix(q: torch.Tensor, k: torch.Tensor, mixing: torch.Tensor, block_size: int, *,
                causal: bool = True) -> torch.Tensor:
    """`A [N, N]`, `A[t, s] = Mc[blk(t), blk(s)] q_t . k_s` (zero above the diagonal when
    `causal`) of one head's feature-mapped `q, k` `[N, d]` and its `mixing` `[>= M, >= M]`
    (its leading corner is used, as the operator does)."""
    n = q.shape[0]
    m = -(-n // block_size)
    if mixing.dim() != 2 or min(mixing.shape) < m:
        raise ValueError(f"mixing has shape {tuple(mixing.shape)}; one head's [M, M] with "
                         f"M >= {m} blocks of {block_size} for {n} tokens is needed")
    blk = torch.arange(n, device=q.device) // block_size
    weight = mixing[:m, :m].to(q.dtype)[blk][:, blk]
    a = (q @ k.T) * weight
    return a.tril() if causal else a


def linear_matrix(q: torch.Tensor, k: torch.Tensor, *, causal: bool = True) -> torch.Tensor:
    """Plain linear attention's `phi(Q) phi(K)^T`: MHLA with `Mc = ones` (one block)."""
    a = q @ k.T
    return a.tril() if causal else a


def softmax_matrix(q: torch.Tensor, k: torch.Tensor, *, causal: bool = True) -> torch.Tensor:
    """`softmax(q k^T / sqrt(d))` (causal: masked to `s <= t`), rows summing to 1."""
    scores = (q @ k.T) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(),
                                    float("-inf"))
    return scores.softmax(-1)


def operator_matrix(a: torch.Tensor, *, normalize: bool, eps: float = 1e-6,
                    scale: float | None = None) -> torch.Tensor:
    """The matrix the MHLA operator applies to `v`: `A / (A 1 + eps)` or `scale * A`
    (`scale` default `d**-0.5` is the caller's; 1 here, as the diagnostics ignore it)."""
    if normalize:
        return a / (a.sum(-1, keepdim=True) + eps)
    return a * (1.0 if scale is None else scale)


# -- the measurements -------------------------------------------------------------------------

def numerical_rank(a: torch.Tensor, tol: float = 1e-6) -> int:
    """The number of singular values above `tol * s_max` (0 for a zero matrix)."""
    s = torch.linalg.svdvals(a.double())
    return int((s > tol * s[0]).sum()) if s.numel() and s[0] > 0 else 0


def effective_rank(a: torch.Tensor) -> float:
    """Roy & Vetterli (2007): `exp(entropy of s / sum s)`; an `n x n` identity gives `n`."""
    s = torch.linalg.svdvals(a.double())
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    return float(torch.exp(-(p * p.clamp_min(1e-300).log()).sum()))


def row_entropy(a: torch.Tensor, *, causal: bool = True) -> tuple[float, float, float]:
    """`(mean entropy, mean maximum, mean entropy / maximum)` of the rows of `a` `[N, N]`
    made distributions by `|row| / sum |row|`, in nats. A causal row `t` has `t + 1`
    entries (maximum `log(t + 1)`), a non-causal one `N`. Rows of zero mass are left out,
    and rows with one entry (maximum 0) out of the ratio."""
    w = a.double().abs()
    n = w.shape[0]
    if causal:
        w = w.tril()
    mass = w.sum(-1)
    p = w / mass.clamp_min(1e-300)[:, None]
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
    entries = torch.arange(1, n + 1, dtype=w.dtype) if causal else torch.full((n,), float(n),
                                                                               dtype=w.dtype)
    maximum = entries.log()
    kept = mass > 0
    if not kept.any():
        raise ValueError("every row of the attention matrix is zero: no entropy to measure")
    ratio_rows = kept & (entries > 1)
    ratio = (entropy[ratio_rows] / maximum[ratio_rows]).mean() if ratio_rows.any() else 1.0
    return float(entropy[kept].mean()), float(maximum[kept].mean()), float(ratio)


def matrix_stats(op: torch.Tensor, *, causal: bool = True, tol: float = 1e-6) -> dict:
    """The `METRICS` of one operator matrix (see the module docstring)."""
    h, hmax, ratio = row_entropy(op, causal=causal)
    rows = op / op.abs().sum(-1, keepdim=True).clamp_min(1e-300)
    return {"rank": numerical_rank(op, tol), "effective_rank": effective_rank(op),
            "effective_rank_rows": effective_rank(rows), "row_entropy": h,
            "max_entropy": hmax, "entropy_ratio": ratio}


def head_stats(q: torch.Tensor, k: torch.Tensor, *, mixing: torch.Tensor | None,
               block_size: int | None, normalize: bool, causal: bool = True,
               tol: float = 1e-6) -> dict[str, dict]:
    """`{kind: METRICS}` of one head's `q, k` `[N, d]`: with `mixing` (`[M, M]`, this head's)
    the MHLA and the linear matrix of the same features; without, the softmax matrix."""
    q, k = q.double(), k.double()
    if mixing is None:
        return {"softmax": matrix_stats(softmax_matrix(q, k, causal=causal), causal=causal,
                                        tol=tol)}
    mats = {"mhla": mhla_matrix(q, k, mixing.double(), block_size, causal=causal),
            "linear": linear_matrix(q, k, causal=causal)}
    return {kind: matrix_stats(operator_matrix(a, normalize=normalize), causal=causal, tol=tol)
            for kind, a in mats.items()}


# -- a run's model -------------------------------------------------------------------------

def capture_qk(model: torch.nn.Module, tokens: torch.Tensor,
               layers: Sequence[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """`{layer: (q, k)}`, each `[B, N, H, d]`, of `tokens` `[B, N]` as the layers see them:
    MHLA after the feature map and rotary (`features`), softmax after rotary."""
    from mhla_dist.parallel.tp_layers import ParallelMHLAttention

    captured: dict[int, list] = {i: [] for i in layers}
    patched = []
    for i in layers:
        attn = model.layers[i].attn
        if isinstance(attn, ParallelMHLAttention):
            name, orig = "features", attn.features

            def hook(*args, _orig=orig, _out=captured[i], **kwargs):
                q, k, v = _orig(*args, **kwargs)
                _out.extend([q, k])
                return q, k, v
        else:  # softmax: forward rotates q, then k
            name, orig = "maybe_rotate", attn.maybe_rotate

            def hook(*args, _orig=orig, _out=captured[i], **kwargs):
                x = _orig(*args, **kwargs)
                _out.append(x)
                return x
        setattr(attn, name, hook)  # an instance attribute shadows the method
        patched.append((attn, name))
    try:
        with torch.no_grad():
            model.hidden_states(tokens)
    finally:
        for attn, name in patched:
            delattr(attn, name)
    for i, got in captured.items():
        if len(got) != 2:
            raise RuntimeError(f"layer {i}: captured {len(got)} tensors, expected q and k")
    return {i: (got[0].detach(), got[1].detach()) for i, got in captured.items()}


def select(spec: str, count: int, what: str) -> list[int]:
    """`"all"` or comma-separated indices in `[0, count)`."""
    if spec == "all":
        return list(range(count))
    try:
        picked = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"{what}={spec!r}: give 'all' or comma-separated integers") from None
    bad = [i for i in picked if not 0 <= i < count]
    if not picked:
        raise ValueError(f"{what}={spec!r} names none: give 'all' or indices in [0, {count})")
    if bad:
        raise ValueError(f"{what}={spec!r}: {bad} not in [0, {count}) "
                         f"(the model has {count} {what})")
    return sorted(set(picked))


def analyse(model: torch.nn.Module, tokens: torch.Tensor, layers: Sequence[int],
            heads: Sequence[int], *, tol: float = 1e-6) -> list[dict]:
    """One row per layer, head and kind: the `METRICS` averaged over the windows `tokens`
    `[W, N]`, with `layer, head, kind, tokens, windows`."""
    from mhla_dist.parallel.tp_layers import ParallelMHLAttention

    captured = capture_qk(model, tokens, layers)
    rows = []
    for i in layers:
        attn = model.layers[i].attn
        mhla = isinstance(attn, ParallelMHLAttention)
        mixing = attn.effective_mixing().detach() if mhla else None
        q, k = captured[i]
        for h in heads:
            head_mixing = None if mixing is None else mixing[h] if mixing.dim() == 3 else mixing
            per_window = [head_stats(q[w, :, h], k[w, :, h], mixing=head_mixing,
                                     block_size=attn.block_size if mhla else None,
                                     normalize=attn.normalize if mhla else True,
                                     causal=attn.causal, tol=tol)
                          for w in range(tokens.shape[0])]
            for kind in per_window[0]:
                mean = {m: sum(s[kind][m] for s in per_window) / len(per_window)
                        for m in METRICS}
                rows.append({"layer": i, "head": h, "kind": kind, **mean,
                             "tokens": tokens.shape[1], "windows": tokens.shape[0]})
    return rows


# -- the input windows ----------------------------------------------------------------------

def text_windows(path: Path, n: int, count: int, tokenizer: str = "byte") -> torch.Tensor:
    """Up to `count` consecutive windows `[W, n]` of a text file's tokens."""
    from mhla_dist.data import load_tokenizer

    ids = torch.from_numpy(load_tokenizer(tokenizer).encode(Path(path).read_text()).astype("int64"))
    if len(ids) < n:
        raise ValueError(f"{path} holds {len(ids)} tokens; --tokens {n} needs at least {n}")
    w = min(count, len(ids) // n)
    return ids[:w * n].view(w, n)


def shard_windows(urls: str, n: int, count: int, *, vocab_size: int,
                  one_document: bool) -> torch.Tensor:
    """Up to `count` windows `[W, n]` of held-out shards read in order: unpadded, and
    inside one document when `one_document`."""
    from mhla_dist.data import lm_loader

    loader = lm_loader(urls, seq_len=n, batch_size=1, shuffle=False, num_epochs=1,
                       vocab_size=vocab_size)
    found = []
    for batch in loader:
        toks, docs = batch["tokens"][0, :n], batch["doc_ids"][0, :n]
        if (docs < 0).any() or (one_document and (docs != docs[0]).any()):
            continue
        found.append(toks)
        if len(found) == count:
            break
    if not found:
        inside = " inside one document (the run trains with data.document_masking)" \
            if one_document else ""
        raise ValueError(f"no unpadded window of {n} tokens{inside} in {urls}: "
                         f"use fewer --tokens or --text FILE")
    return torch.stack(found)


def analyse_run(run_dir: Path, *, layers: str = "all", heads: str = "all",
                tokens: int | None = None, windows: int = 1, data: str | None = None,
                text: Path | None = None, tokenizer: str = "byte",
                tol: float = 1e-6) -> dict:
    """The diagnostic of a run directory on `windows` windows of `tokens` tokens (default
    `min(256, max_seq_len)`) of `text`, else the shards `data`, else the run's `data.eval`.
    `layers`: `all`, `mhla` (MHLA layers only) or indices; `heads`: `all` or indices."""
    from .runs import loaded_lm

    with loaded_lm(run_dir) as (cfg, model):
        m = model.cfg
        n = min(256, m.max_seq_len) if tokens is None else tokens
        if not 2 <= n <= m.max_seq_len:
            raise ValueError(f"--tokens {n}: must be in [2, model.max_seq_len={m.max_seq_len}]")
        if windows < 1:
            raise ValueError(f"--windows {windows}: must be >= 1")
        mhla_layers = [i for i in range(m.num_layers) if i not in m.softmax_layers]
        picked = mhla_layers if layers == "mhla" else select(layers, m.num_layers, "layers")
        if not picked:
            raise ValueError(f"--layers mhla: every layer of {run_dir} is softmax attention "
                             f"(model.softmax_layers={list(m.softmax_layers)})")
        if text is not None:
            source, x = str(text), text_windows(text, n, windows, tokenizer)
        else:
            source = data or cfg.data.eval
            if not source:
                raise ValueError(f"{run_dir}: the run's data.eval is empty; pass --data URLS "
                                 f"or --text FILE")
            x = shard_windows(source, n, windows, vocab_size=m.vocab_size,
                              one_document=cfg.data.document_masking)
        if int(x.max()) >= m.vocab_size:
            raise ValueError(f"token id {int(x.max())} of {source} is outside the model's "
                             f"vocab_size={m.vocab_size}: pass the run's --tokenizer")
        log.info("%d window(s) of %d tokens from %s; layers %s", len(x), n, source, picked)
        rows = analyse(model, x, picked, select(heads, m.num_heads, "heads"), tol=tol)
        return {"run_dir": str(run_dir), "source": source, "tokens": n, "windows": len(x),
                "tol": tol, "normalize": m.normalize, "block_size": m.block_size,
                "num_blocks": -(-n // m.block_size), "head_dim": m.head_dim,
                "softmax_layers": list(m.softmax_layers), "rows": rows,
                "summary": summarise(rows)}


def summarise(rows: list[dict]) -> dict[str, dict]:
    """`{kind: mean effective ranks and entropy ratio}` over all rows of each kind."""
    out = {}
    for kind in KINDS:
        got = [r for r in rows if r["kind"] == kind]
        if got:
            out[kind] = {m: sum(r[m] for r in got) / len(got)
                         for m in ("effective_rank", "effective_rank_rows", "entropy_ratio")}
    return out
