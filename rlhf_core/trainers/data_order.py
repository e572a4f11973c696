"""The data order: a deterministic, epoch-seeded permutation stream; the position `(epoch, index)` in it is
saved in every checkpoint, which is what makes resume exact."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class DataPosition:
    """Where the next row comes from: row `index` of the permutation of `epoch`."""

    epoch: int = 0
    index: int = 0


class EpochPermutationSampler:
    """An endless stream of row indices: epoch e is `randperm(num_rows)` under seed `seed + e`.

    Stateless: the stream is a pure function of `(seed, epoch, index)`, so a `DataPosition` restores it
    exactly. A step that reaches the end of an epoch continues into the next one.
    """

    def __init__(self, num_rows: int, seed: int) -> None:
        if num_rows <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.num_rows = num_rows
        self.seed = seed
        self._cache: tuple[int, list[int]] | None = None

    def permutation(self, epoch: int) -> list[int]:
        """The row order of `epoch`."""
        if self._cache is None or self._cache[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._cache = (epoch, torch.randperm(self.num_rows, generator=generator).tolist())
        return self._cache[1]

    def take(self, position: DataPosition, count: int) -> tuple[list[int], DataPosition]:
        """The next `count` indices from `position`, and the position after them."""
        epoch, index, out = position.epoch, position.index, []
        while len(out) < count:
            if index == self.num_rows:
                epoch, index = epoch + 1, 0
            take = min(count - len(out), self.num_rows - index)
            out.extend(self.permutation(epoch)[index : index + take])
            index += take
        return out, DataPosition(epoch, index)


def shard_global_batch(
    indices: list[int], batch_size: int, grad_accum_steps: int, num_processes: int, process_index: int
) -> list[list[int]]:
    """This process's micro-batches of one optimizer step.

    The global batch is laid out as `[grad_accum_steps, num_processes, batch_size]`: micro-step a of process p
    gets `indices[(a·P + p)·B : (a·P + p + 1)·B]`.
    """
    expected = batch_size * grad_accum_steps * num_processes
    if len(indices) != expected:
        raise ValueError(f"global batch has {len(indices)} rows, expected {expected}")
    return [indices[(a * num_processes + process_index) * batch_size :][:batch_size] for a in range(grad_accum_steps)]
