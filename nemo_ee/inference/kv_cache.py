"""A static, preallocated KV cache with one slot per attention module and a fill length per row.

Why not megatron's ``StaticInferenceContext``: it keeps one ``sequence_len_offset`` for every layer
and every row. Early exit needs a length per (module, row): after a token exits at layer l, the layers
above l (and the exit blocks not evaluated) lag behind until KV recomputation catches them up, and
each row of a batch exits on its own. Rows are independent, so finished rows can be reset and reused.
"""
from __future__ import annotations

import math
from typing import Hashable, Iterable, Optional, Sequence

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


class QueryLayout:
    """Where the queries of one module call sit: ``positions`` [n, R] of cache rows ``rows``, ``counts[j]`` real.

    Built once per (rows, first positions, counts) in a decode step and shared by every module with that
    layout (in a synchronous step: all layers between two exits), so each layer pays for no index building.
    ``valid``/``select``: None when every query is real (no padding of ragged rows).
    """

    def __init__(self, rows: Sequence[int], starts: Sequence[int], counts: Sequence[int], capacity: int,
                 device: Optional[torch.device] = None) -> None:
        n, r = max(counts), len(rows)
        if max(s + c for s, c in zip(starts, counts)) > capacity:
            raise ValueError(f"position {max(s + c for s, c in zip(starts, counts)) - 1} is outside the cache "
                             f"capacity {capacity}")
        self.n, self.count = n, r
        self.rows = torch.tensor(list(rows), dtype=torch.long, device=device)
        steps = torch.arange(n, dtype=torch.long, device=device).unsqueeze(1)
        self.positions = torch.tensor(list(starts), dtype=torch.long, device=device).unsqueeze(0) + steps
        self.clamped = self.positions.clamp(max=capacity - 1)   # padding queries read a real position
        self.columns = self.rows.unsqueeze(0).expand(n, r)
        ends = [s + c for s, c in zip(starts, counts)]
        self.upto = max(ends)
        first = rows[0]
        self.row_slice = slice(first, first + r) if list(rows) == list(range(first, first + r)) else None
        self.block = (first, starts[0]) if r == 1 else None  # (row, first position) of a one-row call
        if min(counts) == n:
            self.valid = self.select = None
            self.flat_rows, self.flat_positions = self.columns.reshape(-1), self.positions.reshape(-1)
        else:
            self.valid = steps < torch.tensor(list(counts), dtype=torch.long, device=device).unsqueeze(0)
            self.select = self.valid.nonzero(as_tuple=True)
            self.flat_rows, self.flat_positions = self.columns[self.select], self.positions[self.select]
        # one query per row, every row ending at the same position: each attends to all it reads
        if n == 1 and min(ends) == self.upto:
            self.mask = None
        else:
            keys = torch.arange(self.upto, device=device).view(1, 1, self.upto)
            self.mask = (keys <= self.positions.t().unsqueeze(-1)).unsqueeze(1)  # [R, 1, n, upto]

    def pick(self, t: torch.Tensor) -> torch.Tensor:
        """The real queries' entries of ``t`` [n, R, ...], flattened to [m, ...] (n-major)."""
        return t.reshape(-1, *t.shape[2:]) if self.select is None else t[self.select]


def cached_attention(cache: KVCache, slot: Hashable, layout: QueryLayout, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, scale: float, packed: bool = False) -> torch.Tensor:
    """Write the real queries' k/v into ``slot``, then attend each query to its row's cached keys at positions
    <= its own. Padded: q [n, R, heads, d], k/v [n, R, groups, d] -> [n, R, heads * d]. ``packed``: only the
    real queries, [m, 1, ...] in :meth:`QueryLayout.pick` order -> [m, 1, heads * d]."""
    heads, d = query.shape[2], query.shape[3]
    n, r = layout.n, layout.count
    k_all, v_all = cache.k[slot], cache.v[slot]
    if layout.block is not None and not packed:  # one row, consecutive positions: a slice, not a scatter
        row, start = layout.block
        k_all[row, :, start:start + n] = key[:, 0].transpose(0, 1)
        v_all[row, :, start:start + n] = value[:, 0].transpose(0, 1)
    else:
        k_all[layout.flat_rows, :, layout.flat_positions] = (key[:, 0] if packed else layout.pick(key)).to(k_all.dtype)
        v_all[layout.flat_rows, :, layout.flat_positions] = (value[:, 0] if packed else layout.pick(value)).to(
            v_all.dtype)
    if packed and layout.select is not None:
        padded = query.new_zeros(n, r, heads, d)
        padded[layout.select] = query[:, 0]
        query = padded
    rows = layout.row_slice if layout.row_slice is not None else layout.rows
    k, v = k_all[rows, :, :layout.upto], v_all[rows, :, :layout.upto]
    q = query.permute(1, 2, 0, 3)  # [R, heads, n, d]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.to(q.dtype), v.to(q.dtype), attn_mask=layout.mask, scale=scale, enable_gqa=heads != k.shape[1])
    out = out.permute(2, 0, 1, 3).reshape(n, r, heads * d)
    return layout.pick(out).unsqueeze(1) if packed else out


class CachedCoreAttention(torch.nn.Module):
    """Stands in for a layer's ``core_attention`` while the decoder runs megatron's own modules.

    megatron's ``SelfAttention`` computes q/k/v (and RoPE) and calls ``core_attention(q, k, v, mask, ...)``;
    this runs :func:`cached_attention` on the call's :class:`QueryLayout` (set by the decoder).
    """

    def __init__(self, cache: KVCache, slot: Hashable, softmax_scale: Optional[float], head_dim: int) -> None:
        super().__init__()
        self.cache, self.slot = cache, slot
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.layout: Optional[QueryLayout] = None

    def forward(self, query, key, value, attention_mask=None, **_: object) -> torch.Tensor:
        return cached_attention(self.cache, self.slot, self.layout, query, key, value, self.scale)
