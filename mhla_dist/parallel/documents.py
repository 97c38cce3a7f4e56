"""The packed documents of one batch, as every attention layer of a forward needs them.

The offsets are global (`cu_seqlens` over the flattened `B * N` tokens of the whole
sequence, every row boundary among them, as the data loader emits them); each CP rank
holds the columns `[r N/P, (r+1) N/P)` of every row. MHLA layers read this rank's
`DocumentLayout` (built once per block size and reused by every layer), softmax layers
the offsets themselves, and rotary embeddings the position of every token within its
document.
"""

from __future__ import annotations

import torch

from mhla_kernels import DocumentLayout, check_cu_seqlens, document_layout, document_positions


class PackedDocuments:
    """Documents of a `[B, n]` CP shard (rank `cp_rank` of `cp_size`) on `device`."""

    def __init__(self, cu_seqlens: torch.Tensor, batch: int, local_tokens: int, *,
                 cp_rank: int = 0, cp_size: int = 1, device=None) -> None:
        row = cp_size * local_tokens
        self.cu_seqlens = check_cu_seqlens(cu_seqlens, batch * row, row)
        self.batch, self.local_tokens = batch, local_tokens
        self.cp_rank, self.cp_size, self.device = cp_rank, cp_size, device
        self._layouts: dict[int, DocumentLayout] = {}
        self._positions: torch.Tensor | None = None

    def layout(self, block_size: int) -> DocumentLayout:
        """This rank's MHLA layout for `block_size` (cached)."""
        if block_size not in self._layouts:
            self._layouts[block_size] = document_layout(
                self.cu_seqlens, self.batch, self.local_tokens, block_size,
                cp_size=self.cp_size, cp_rank=self.cp_rank, device=self.device)
        return self._layouts[block_size]

    @property
    def positions(self) -> torch.Tensor:
        """`[B, n]` position of every local token within its document (cached)."""
        if self._positions is None:
            row = self.cp_size * self.local_tokens
            lo = self.cp_rank * self.local_tokens
            pos = document_positions(self.cu_seqlens).view(self.batch, row)
            self._positions = pos[:, lo:lo + self.local_tokens].to(self.device,
                                                                   non_blocking=True)
        return self._positions
