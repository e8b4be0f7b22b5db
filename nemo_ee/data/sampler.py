"""Batch samplers that make training resumable: the data order is a function of the step only."""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields this data-parallel rank's share of each global batch, from step ``start_step()`` on.

    Step ``k`` uses samples ``k*G .. (k+1)*G`` of an endless stream made of seeded permutations of
    the dataset (one per pass), so a run resumed at step N sees exactly what an unbroken run sees.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        total_steps: int,
        seed: int,
        start_step: Callable[[], int] = lambda: 0,
        dp_rank: int = 0,
        dp_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if num_samples < 1:
            raise ValueError("the dataset is empty: no window of seq_length tokens fits")
        if global_batch_size % dp_size:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by data-parallel size {dp_size}")
        self.num_samples, self.global_batch_size, self.total_steps = num_samples, global_batch_size, total_steps
        self.seed, self.start_step, self.dp_rank, self.dp_size, self.shuffle = seed, start_step, dp_rank, dp_size, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _sample(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if not self.shuffle:
            return offset
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(self.seed + epoch).permutation(self.num_samples)}
        return int(self._perms[epoch][offset])

    def __len__(self) -> int:
        return self.total_steps

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.global_batch_size // self.dp_size
        for step in range(self.start_step(), self.total_steps):
            first = step * self.global_batch_size + self.dp_rank * per_rank
            yield [self._sample(first + i) for i in range(per_rank)]
