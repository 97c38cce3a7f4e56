"""Packed documents: MHLA restarted at every document of a packed sequence (DESIGN §1
"Packed documents").

`cu_seqlens` are the offsets `[num_docs + 1]` of the documents in the token axis, as in
flash-linear-attention; with a batch of `B` rows of `N` tokens they index the flattened
`B * N` axis and every row boundary `b * N` is a document boundary (for `B == 1` this is
fla's convention exactly).

How it is computed, with no loop over documents. Cut the token axis at every document
boundary, at every document-relative block boundary `bos_d + jC`, and (under context
parallelism) at every rank boundary: the pieces ("segments") are what a rank holds of one
block of one document, at most `C` tokens each. Lay every segment of this rank into a slot
of `C` tokens (zero padding after it) and mix the slots with

    W[s, s'] = Mc[j_s, j_s'] * [doc_s == doc_s']                (causal: s' before s)

where `j_s` is the document-relative block of segment `s`. MHLA over the slots with `W`
equals MHLA run on every document alone: a cut block's segments are the virtual blocks
of `split_blocks` (within a block every segment reads the earlier ones with `Mc[j, j]`,
the causal intra-block term; non-causal, every segment reads the whole block), zero
tokens contribute nothing (the feature map was applied before), and `W` is zero between
documents. `W` is the usual `[1 or H, M', M']` mixing of `mhla`, so the torch and Triton
backends run it unchanged, and autograd sums `dMc` over the documents through the gather.

Every index is computed on the host from the (host) offsets, so building a layout costs
no device synchronisation; a layout is reused by every layer of a forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import blocked


def check_cu_seqlens(cu_seqlens, total_tokens: int, row_tokens: int | None = None) -> torch.Tensor:
    """The offsets as a host int64 tensor, after checking them: 1-D, integer, starting at 0,
    strictly increasing, ending at `total_tokens`, and (for `B` rows of `row_tokens`)
    holding every row boundary. Raises ValueError naming the offending values."""
    if not isinstance(cu_seqlens, torch.Tensor):
        cu_seqlens = torch.as_tensor(cu_seqlens)
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens has dtype {cu_seqlens.dtype}; it must hold integers "
                        "(int32 or int64 offsets)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens has shape {tuple(cu_seqlens.shape)}; expected "
                         "[num_docs + 1] offsets (at least [0, N])")
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    first, last = int(cu[0]), int(cu[-1])
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {first} (offsets {_show(cu)})")
    if last != total_tokens:
        raise ValueError(f"cu_seqlens must end at the {total_tokens} tokens of the sequence "
                         f"(B * N), got {last} (offsets {_show(cu)})")
    steps = cu[1:] - cu[:-1]
    if (steps <= 0).any():
        i = int(torch.nonzero(steps <= 0)[0])
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty documents): "
                         f"cu_seqlens[{i}]={int(cu[i])}, cu_seqlens[{i + 1}]={int(cu[i + 1])}")
    if row_tokens is not None and total_tokens != row_tokens:
        rows = torch.arange(0, total_tokens + 1, row_tokens)
        missing = rows[~torch.isin(rows, cu)]
        if missing.numel():
            raise ValueError(
                f"cu_seqlens index the flattened B * N = {total_tokens} tokens of rows of "
                f"{row_tokens}; every row boundary must be a document boundary, but "
                f"{missing[:8].tolist()} are missing (offsets {_show(cu)})")
    return cu


def _show(cu: torch.Tensor) -> str:
    values = cu.tolist()
    return str(values) if len(values) <= 12 else f"{values[:6]} ... {values[-3:]}"


def document_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The document index of every token `[cu_seqlens[-1]]` (host int64)."""
    cu = cu_seqlens.to("cpu", torch.int64)
    return torch.repeat_interleave(torch.arange(cu.numel() - 1), cu[1:] - cu[:-1])


def document_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The position of every token within its document `[cu_seqlens[-1]]` (host int64)."""
    cu = cu_seqlens.to("cpu", torch.int64)
    lengths = cu[1:] - cu[:-1]
    return torch.arange(int(cu[-1])) - torch.repeat_interleave(cu[:-1], lengths)


def _segments(cu: torch.Tensor, block_size: int, chunk: int):
    """Every segment of the flattened axis: `(start, stop, doc, block)` host int64 tensors,
    in token order. Cuts: document boundaries, document-relative block boundaries, and the
    multiples of `chunk` (the CP shards of every row)."""
    lengths = cu[1:] - cu[:-1]
    blocks = (lengths + block_size - 1) // block_size
    num = int(blocks.sum())
    blk_doc = torch.repeat_interleave(torch.arange(lengths.numel()), blocks, output_size=num)
    first = torch.cumsum(blocks, 0) - blocks
    j = torch.arange(num) - first[blk_doc]
    start = cu[:-1][blk_doc] + j * block_size
    stop = torch.minimum(start + block_size, cu[1:][blk_doc])
    pieces = (stop - 1) // chunk - start // chunk + 1
    total = int(pieces.sum())
    seg_blk = torch.repeat_interleave(torch.arange(num), pieces, output_size=total)
    i = torch.arange(total) - (torch.cumsum(pieces, 0) - pieces)[seg_blk]
    cut = (start[seg_blk] // chunk + i) * chunk
    seg_start = torch.maximum(start[seg_blk], cut)
    seg_stop = torch.minimum(stop[seg_blk], cut + chunk)
    return seg_start, seg_stop, blk_doc[seg_blk], j[seg_blk], int(blocks.max())


def _scatter(x: torch.Tensor, index: torch.Tensor, slots: int) -> torch.Tensor:
    """Tokens `x` `[B, n, ...]` into `[1, slots, ...]` at `index` `[B * n]`, zeros elsewhere."""
    flat = x.reshape(-1, *x.shape[2:])
    return flat.new_zeros(slots, *flat.shape[1:]).index_copy_(0, index, flat).unsqueeze(0)


def _gather(x: torch.Tensor, index: torch.Tensor, shape) -> torch.Tensor:
    """Slots `x` `[1, S, ...]` at `index` `[B * n]` as tokens `[*shape, ...]`."""
    return x[0].index_select(0, index).view(*shape, *x.shape[2:])


class _ToSlots(torch.autograd.Function):
    """Tokens into their slots (zero padding between); the adjoint gathers them back."""

    @staticmethod
    def forward(ctx, x, index, slots):
        ctx.save_for_backward(index)
        ctx.shape = tuple(x.shape[:2])
        return _scatter(x, index, slots)

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        return _gather(g, index, ctx.shape), None, None


class _FromSlots(torch.autograd.Function):
    """Slots back to tokens; the adjoint scatters the gradient into the slots."""

    @staticmethod
    def forward(ctx, x, index, shape):
        ctx.save_for_backward(index)
        ctx.slots = x.shape[1]
        return _gather(x, index, shape)

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        return _scatter(g, index, ctx.slots), None, None


@dataclass(frozen=True)
class DocumentLayout:
    """One rank's segments of a packed batch (see the module docstring): how its tokens
    go into slots of `block_size`, and which document and document-relative block every
    slot (this rank's rows) and every gathered slot (all ranks' columns) belongs to.
    Build it with `document_layout`; `mhla` and `cp_mhla` accept it as `cu_seqlens`."""

    block_size: int
    slot_size: int          # tokens per slot: block_size, or a divisor of it
    batch: int
    local_tokens: int
    cp_size: int
    cp_rank: int
    num_slots: int          # slots per rank (the most segments any rank has)
    max_doc_blocks: int     # blocks of the longest document
    slot_of_token: torch.Tensor  # [B * n] slot position of every local token
    row_block: torch.Tensor      # [S] document-relative block of this rank's slots
    row_doc: torch.Tensor        # [S] document of this rank's slots (-1: padding)
    col_block: torch.Tensor      # [P * S] the same for the gathered slots of every rank
    col_doc: torch.Tensor

    def to(self, device) -> DocumentLayout:
        """The layout with its index tensors on `device`."""
        moved = {f: getattr(self, f).to(device, non_blocking=True) for f in _INDEX_FIELDS}
        return DocumentLayout(**{**self.__dict__, **moved})

    @property
    def device(self) -> torch.device:
        return self.slot_of_token.device

    def check(self, q: torch.Tensor, mixing: torch.Tensor, block_size: int) -> None:
        """Raise unless this layout was built for `q`'s shape, `block_size` and device,
        and every document fits `mixing`."""
        if (self.batch, self.local_tokens, self.block_size) != (q.shape[0], q.shape[1],
                                                                block_size):
            raise ValueError(
                f"the document layout was built for B={self.batch}, {self.local_tokens} "
                f"tokens per row, block_size={self.block_size}; the call has B={q.shape[0]}, "
                f"{q.shape[1]} tokens, block_size={block_size}")
        if self.device != q.device:
            raise ValueError(f"the document layout is on {self.device}, q on {q.device}: "
                             "move it with layout.to(q.device)")
        if self.max_doc_blocks > mixing.shape[-1]:
            raise ValueError(
                f"the longest document has {self.max_doc_blocks} blocks of {block_size} "
                f"tokens but mixing is {mixing.shape[-1]}x{mixing.shape[-1]}: documents may "
                f"hold at most {mixing.shape[-1] * block_size} tokens (split longer ones, "
                "or size Mc for a longer max_seq_len)")

    def to_slots(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens `[B, n, H, e]` -> slots `[1, S * slot_size, H, e]` (zero
        padded)."""
        return _ToSlots.apply(x, self.slot_of_token, self.num_slots * self.slot_size)

    def from_slots(self, o: torch.Tensor) -> torch.Tensor:
        """Slots `[1, S * C, H, e]` -> this rank's tokens `[B, n, H, e]`."""
        return _FromSlots.apply(o, self.slot_of_token, (self.batch, self.local_tokens))

    def slot_mixing(self, mixing: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Single device: `W[s, s'] = Mc[j_s, j_s'] [doc_s == doc_s']`, `[S, S]` or
        `[H, S, S]` (causal `mhla` reads only its lower triangle)."""
        if self.cp_size != 1:
            raise ValueError("slot_mixing is the single-device matrix; under context "
                             "parallelism use mixing_rows and mixing_diagonal")
        same = (self.row_doc[:, None] == self.col_doc[None, :]).to(dtype)
        return mixing[..., self.row_block[:, None], self.col_block[None, :]].to(dtype) * same

    def mixing_rows(self, mixing: torch.Tensor, dtype: torch.dtype, *, causal: bool):
        """This rank's rows of the slot mixing over every rank's gathered slots,
        `[1 or H, S, P * S]`; causal keeps only the earlier slots of the same document
        (the diagonal is `mixing_diagonal`'s)."""
        keep = (self.row_doc[:, None] == self.col_doc[None, :]) & (self.row_doc[:, None] >= 0)
        if causal:
            cols = torch.arange(self.col_doc.numel(), device=self.device)
            rows = cols[:self.num_slots] + self.cp_rank * self.num_slots
            keep &= cols[None, :] < rows[:, None]
        w = mixing[..., self.row_block[:, None], self.col_block[None, :]].to(dtype) * keep
        return w if w.dim() == 3 else w.unsqueeze(0)

    def mix(self, s: torch.Tensor, z: torch.Tensor, mixing: torch.Tensor, *, causal: bool):
        """Under context parallelism: this rank's mixed summaries `T` `[1, S, H, d, dv]`,
        `y` `[1, S, H, d]` from every rank's gathered slot summaries `s` `[1, P * S, H, d,
        dv]`, `z` `[1, P * S, H, d]` (the strictly earlier ones of the same document when
        causal)."""
        rows = self.mixing_rows(mixing, s.dtype, causal=causal)
        t, y = blocked.mix(s.transpose(1, 2), z.transpose(1, 2), rows, causal=False,
                           row_start=0)
        return t.transpose(1, 2), y.transpose(1, 2)

    def mixing_diagonal(self, mixing: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`Mc[j_s, j_s]` of this rank's slots `[S, S]` or `[H, S, S]` as a diagonal
        matrix (zero on padding slots): what the causal intra-block terms read."""
        diag = mixing[..., self.row_block, self.row_block].to(dtype) * (self.row_doc >= 0)
        return torch.diag_embed(diag)


_INDEX_FIELDS = ("slot_of_token", "row_block", "row_doc", "col_block",
                 "col_doc")


def document_layout(cu_seqlens, batch: int, local_tokens: int, block_size: int, *,
                    cp_size: int = 1, cp_rank: int = 0, slot_size: int | None = None,
                    device=None) -> DocumentLayout:
    """The `DocumentLayout` of CP rank `cp_rank` of `cp_size` for a batch of `batch` rows
    of `cp_size * local_tokens` tokens with documents at `cu_seqlens` (global offsets over
    the flattened `batch * cp_size * local_tokens` tokens). Host work only; the index
    tensors are then moved to `device`.

    `slot_size` (a divisor of `block_size`, default `block_size`): segments are cut
    further into slots of this many tokens (virtual blocks: `W` still reads `Mc` of the
    real block), which pads a short document less and makes more slots to mix."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} is not in [0, cp_size={cp_size})")
    if block_size < 1 or local_tokens < 1 or batch < 1:
        raise ValueError(f"block_size={block_size}, local_tokens={local_tokens} and "
                         f"batch={batch} must be >= 1")
    slot_size = block_size if slot_size is None else slot_size
    if slot_size < 1 or block_size % slot_size:
        raise ValueError(f"slot_size={slot_size} must divide block_size={block_size}")
    row = cp_size * local_tokens
    cu = check_cu_seqlens(cu_seqlens, batch * row, row)
    start, stop, doc, block, _ = _segments(cu, slot_size, local_tokens)
    block = block // (block_size // slot_size)
    max_blocks = -(-int((cu[1:] - cu[:-1]).max()) // block_size)
    shard = start // local_tokens
    owner = shard % cp_size
    counts = torch.bincount(owner, minlength=cp_size)
    slots = int(counts.max())
    # Slot index of every segment within its rank (segments are in token order, and
    # within a rank that is also its local order: row-major over its shards).
    order = torch.argsort(owner, stable=True)
    within = torch.empty_like(order)
    within[order] = torch.arange(order.numel()) - (torch.cumsum(counts, 0) - counts)[owner[order]]
    col = owner * slots + within
    col_block = torch.zeros(cp_size * slots, dtype=torch.int64)
    col_doc = torch.full((cp_size * slots,), -1, dtype=torch.int64)
    col_block[col], col_doc[col] = block, doc
    mine = owner == cp_rank
    lengths = (stop - start)[mine]
    tokens = batch * local_tokens
    seg = torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=tokens)
    offset = torch.arange(tokens) - (torch.cumsum(lengths, 0) - lengths)[seg]
    slot_of_token = seg * slot_size + offset
    lo = cp_rank * slots
    layout = DocumentLayout(
        block_size=block_size, slot_size=slot_size, batch=batch, local_tokens=local_tokens,
        cp_size=cp_size, cp_rank=cp_rank, num_slots=slots, max_doc_blocks=max_blocks,
        slot_of_token=slot_of_token,
        row_block=col_block[lo:lo + slots].clone(), row_doc=col_doc[lo:lo + slots].clone(),
        col_block=col_block, col_doc=col_doc)
    return layout if device is None else layout.to(device)


def slot_size_for(cu_seqlens, block_size: int, head_dim: int, *, smallest: int = 16) -> int:
    """The single-device slot size (a divisor of `block_size`, at least `smallest`) of
    least estimated work: per head, `P (6 d^2 + 4 c' d)` for the `P` slot tokens (their
    summaries, outputs and the causal sub-chunks of `c'` tokens) plus `2 S^2 d^2` for the
    mix of the `S` slots. Smaller slots pad short documents less but mix more slots."""
    cu = torch.as_tensor(cu_seqlens).to("cpu", torch.int64)
    lengths = cu[1:] - cu[:-1]
    full, rest = lengths // block_size, lengths % block_size
    best, best_cost = block_size, None
    c = block_size
    while c >= min(smallest, block_size) and block_size % c == 0:
        slots = int((full * (block_size // c)).sum() + ((rest + c - 1) // c).sum())
        sub = blocked.subchunk_size(c)
        cost = slots * c * (6 * head_dim**2 + 4 * sub * head_dim) + 2 * slots**2 * head_dim**2
        if best_cost is None or cost < best_cost:
            best, best_cost = c, cost
        if c % 2:
            break
        c //= 2
    return best


def resolve_layout(cu_seqlens, q: torch.Tensor, mixing: torch.Tensor, block_size: int, *,
                   cp_size: int = 1, cp_rank: int = 0) -> DocumentLayout:
    """CP rank `cp_rank`'s layout for `q` (this rank's tokens) of the global `cu_seqlens`,
    or the given layout after checking it is that rank's; checked against `q` and
    `mixing`. Built here on one device, its slot size is `slot_size_for`'s (under CP the
    block: finer slots would gather more summaries)."""
    if isinstance(cu_seqlens, DocumentLayout):
        layout = cu_seqlens
        if (layout.cp_size, layout.cp_rank) != (cp_size, cp_rank):
            if cp_size == 1:
                raise ValueError("this layout is one context-parallel rank's: use cp_mhla")
            raise ValueError(f"the document layout is CP rank {layout.cp_rank} of "
                             f"{layout.cp_size}; this is rank {cp_rank} of {cp_size}")
    else:
        b, n = q.shape[0], q.shape[1]
        cu = check_cu_seqlens(cu_seqlens, b * n * cp_size, n * cp_size)
        slot = slot_size_for(cu, block_size, q.shape[-1]) if cp_size == 1 else block_size
        layout = document_layout(cu, b, n, block_size, cp_size=cp_size, cp_rank=cp_rank,
                                 slot_size=slot, device=q.device)
    layout.check(q, mixing, block_size)
    return layout
