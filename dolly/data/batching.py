"""Length-grouped sampling: batches of records of similar length, so little padding is computed.

Dolly v1 drew random batches and padded each to its longest record; on Alpaca about 46% of the
tokens it computed were padding. Here each epoch is a seeded permutation cut into megabatches
of `group_batches` optimizer micro-steps; a megabatch is sorted by length and cut into steps of
`batch_size * world_size` records, and the steps are shuffled. The Trainer (through accelerate)
hands batch j of the stream to rank j % world_size, so the ranks of one step get records of
similar length as well and nobody waits for a rank with longer records.

Smaller `group_batches` keeps batches more mixed (closer to random), larger pads less.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Every index exactly once per epoch; the order depends only on (seed, epoch)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int = 1,
                 group_batches: int = 8, seed: int = 0):
        if batch_size < 1 or world_size < 1 or group_batches < 1:
            raise ValueError("batch_size, world_size and group_batches must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.step = batch_size * world_size
        self.group = group_batches
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at each epoch (also when resuming), so resumes replay exactly."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())

    def order(self) -> np.ndarray:
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = rng.permutation(n)
        mega = self.step * self.group
        steps = []
        for s in range(0, n, mega):
            m = perm[s:s + mega]
            m = m[np.argsort(-self.lengths[m], kind="stable")]
            steps.extend(m[i:i + self.step] for i in range(0, len(m), self.step))
        # A short last step stays last: moving it would shift every later batch across ranks.
        tail = [steps.pop()] if steps and len(steps[-1]) < self.step else []
        steps = [steps[i] for i in rng.permutation(len(steps))] + tail
        return np.concatenate(steps) if steps else np.zeros(0, dtype=np.int64)


def padding_efficiency(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> float:
    """Real tokens / tokens computed when `order` is cut into batches padded to their longest."""
    lengths = np.asarray(lengths)
    order = np.asarray(order)
    real = computed = 0
    for i in range(0, len(order), batch_size):
        b = lengths[order[i:i + batch_size]]
        real += int(b.sum())
        computed += int(b.max()) * len(b)
    return real / computed if computed else 1.0
