"""A static, preallocated KV cache with one slot per attention module and a fill length per row.

Why not megatron's ``StaticInferenceContext``: it keeps one ``sequence_len_offset`` for every layer
and every row. Early exit needs a length per (module, row): after a token exits at layer l, the layers
above l (and the exit blocks not evaluated) lag behind until KV recomputation catches them up, and
each row of a batch exits on its own. Rows are independent, so finished rows can be reset and reused.
"""
from __future__ import annotations

import math
from typing import Hashable, Iterable, Optional

import torch


class KVCache:
    """``k[slot]``/``v[slot]``: [batch, groups, capacity, head_dim]; ``length[slot][row]``: filled prefix."""

    def __init__(
        self,
        slots: Iterable[Hashable],
        batch_size: int,
        capacity: int,
        groups: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ) -> None:
        if batch_size < 1 or capacity < 1:
            raise ValueError(f"batch_size={batch_size} and capacity={capacity} must be >= 1")
        self.batch_size, self.capacity = batch_size, capacity
        shape = (batch_size, groups, capacity, head_dim)
        self.k = {s: torch.zeros(shape, dtype=dtype, device=device) for s in slots}
        self.v = {s: torch.zeros(shape, dtype=dtype, device=device) for s in self.k}
        self.length = {s: [0] * batch_size for s in self.k}

    @property
    def slots(self) -> list:
        return list(self.k)

    def update(self, slot: Hashable, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> None:
        """Write k/v [n, groups, head_dim] of (rows[j], positions[j]) for j < n."""
        if positions.numel() and int(positions.max()) >= self.capacity:
            raise ValueError(f"position {int(positions.max())} is outside the cache capacity {self.capacity}")
        self.k[slot][rows, :, positions] = k.to(self.k[slot].dtype)
        self.v[slot][rows, :, positions] = v.to(self.v[slot].dtype)

    def read(self, slot: Hashable, rows: torch.Tensor, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``rows`` for positions [0, upto): [len(rows), groups, upto, head_dim]."""
        return self.k[slot][rows, :, :upto], self.v[slot][rows, :, :upto]

    def truncate(self, row: int, length: int) -> None:
        """Forget every entry of ``row`` at or after ``length`` (rejected drafts, a reused row)."""
        for lengths in self.length.values():
            lengths[row] = min(lengths[row], length)


class CachedCoreAttention(torch.nn.Module):
    """Stands in for a layer's ``core_attention`` while the decoder runs it.

    megatron's ``SelfAttention`` computes q/k/v (and RoPE) and calls ``core_attention(q, k, v, mask, ...)``;
    this writes k/v of the valid (position, row) pairs into the cache slot, then attends each query
    to the row's cached keys at positions <= its own.
    """

    def __init__(self, cache: KVCache, slot: Hashable, heads: int, groups: int, head_dim: int,
                 softmax_scale: Optional[float]) -> None:
        super().__init__()
        self.cache, self.slot = cache, slot
        self.heads, self.groups, self.head_dim = heads, groups, head_dim
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.rows: Optional[torch.Tensor] = None       # [R] cache rows of the batch columns
        self.positions: Optional[torch.Tensor] = None  # [n, R] position of each query
        self.valid: Optional[torch.Tensor] = None      # [n, R] real (not padding) queries

    def forward(self, query, key, value, attention_mask=None, **_: object) -> torch.Tensor:
        n, r = self.positions.shape
        row_of = self.rows.unsqueeze(0).expand(n, r)
        self.cache.update(self.slot, row_of[self.valid], self.positions[self.valid], key[self.valid],
                          value[self.valid])
        upto = int(self.positions[self.valid].max()) + 1
        k, v = self.cache.read(self.slot, self.rows, upto)
        if self.heads != self.groups:
            k = k.repeat_interleave(self.heads // self.groups, dim=1)
            v = v.repeat_interleave(self.heads // self.groups, dim=1)
        q = query.permute(1, 2, 0, 3)  # [R, heads, n, d]
        allowed = torch.arange(upto, device=q.device).view(1, 1, upto) <= self.positions.t().unsqueeze(-1)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=allowed.unsqueeze(1), scale=self.scale
        )
        return out.permute(2, 0, 1, 3).reshape(n, r, self.heads * self.head_dim)
