"""The chunked layout both chunked backends (torch `chunked.py`, `triton/`) compute on, defined once:
how a sequence is cut into chunks, which positions of a chunk see which document's state, and which
earlier chunks a sliding window reaches.

A call of length l is padded to L = nc·Q. Padded positions get log a = 0 and u = 0, so they leave
the state untouched, and continue the last document.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

from .common import document_ids


def pad_rows(t: torch.Tensor, pad: int, dim: int = 1) -> torch.Tensor:
    """t with `pad` zero rows appended along `dim` (the sequence)."""
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


@dataclass(frozen=True)
class Chunks:
    b: int
    h: int
    l: int          # the call's length
    Q: int          # chunk length

    @property
    def pad(self) -> int:
        return (-self.l) % self.Q

    @property
    def nc(self) -> int:
        return (self.l + self.pad) // self.Q

    @property
    def L(self) -> int:
        return self.nc * self.Q

    def heads_first(self, t: torch.Tensor) -> torch.Tensor:
        """A per-position, per-head value (b, l, h) as (b, h, c, Q), zero on padded positions."""
        return pad_rows(t, self.pad).view(self.b, self.nc, self.Q, self.h).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class Documents:
    """Document ids per position, padded (b, L), and the masks the chunked scan needs from them.
    Each mask is 1 where the state may flow and 0 across a document start."""

    ids: torch.Tensor          # (b, L)
    chunks: Chunks

    @property
    def by_chunk(self) -> torch.Tensor:                    # (b, c, Q)
        return self.ids.view(self.chunks.b, self.chunks.nc, self.chunks.Q)

    @property
    def entering(self) -> torch.Tensor:
        """(b, c): the document the state entering each chunk belongs to (the previous chunk's last)."""
        d = self.by_chunk
        return torch.cat([d[:, :1, 0], d[:, :-1, -1]], dim=1)

    def writes_to_end(self, dtype) -> torch.Tensor:
        """(b, 1, c, Q): the position's input reaches the chunk-end state (same document as the chunk's end)."""
        d = self.by_chunk
        return (d == d[:, :, -1:])[:, None].to(dtype)

    def reads_entering(self, dtype) -> torch.Tensor:
        """(b, 1, c, Q): the position reads the state entering its chunk."""
        return (self.by_chunk == self.entering[:, :, None])[:, None].to(dtype)

    def passes_state(self, dtype) -> torch.Tensor:
        """(b, 1, c): the chunk carries the entering state on to its end."""
        return (self.by_chunk[:, :, -1] == self.entering)[:, None].to(dtype)

    def reaches(self, d: int, dtype) -> torch.Tensor:
        """(b, 1, c-d): the state written at the end of chunk c-d belongs to the document entering chunk c."""
        return (self.by_chunk[:, :-d, -1] == self.entering[:, d:])[:, None].to(dtype)

    def in_first_document(self, dtype) -> torch.Tensor:
        """(b, 1, c, Q): the position is in the sequence's first document (sees the initial state)."""
        d = self.by_chunk
        return (d == d[:, :1, :1])[:, None].to(dtype)


def documents(seq_idx: Optional[torch.Tensor], chunks: Chunks) -> Optional[Documents]:
    ids = document_ids(seq_idx)
    if ids is None:
        return None
    ids = torch.cat([ids, ids[:, -1:].expand(chunks.b, chunks.pad)], dim=1)    # padding continues the last doc
    return Documents(ids, chunks)


def window_key_chunks(nc: int, Q: int, r: int) -> Iterator[Tuple[int, bool]]:
    """The earlier chunks c-d a window of r tokens reaches from chunk c, nearest first, as (d, whole):
    whole when every position of chunk c-d lies in the window of every position of chunk c (its
    chunk-end state serves), else cut by the window's edge (a masked block of scores). The whole
    ones come first: (d + 1)·Q <= r holds for a prefix of d."""
    d = 1
    while d < nc and (d - 1) * Q + 1 < r:          # some pair (t, i) lies in the window
        yield d, (d + 1) * Q <= r
        d += 1
