"""Which rows each worker trains on, in which order: one definition for in-memory and streamed data.

The epoch's order permutes blocks of ORDER_BLOCK_ROWS consecutive rows, then the rows inside each block, both
seeded by (seed, epoch). A reader therefore only ever needs one block at a time (bounded memory for data of any
size), and an in-memory dataset and its Parquet copy are read in exactly the same order.

Worker `rank` of `world_size` takes the rank-th contiguous 1/world_size of that order, so its shard depends only
on (rank, world size); batch `b` is a fixed slice of it, so resuming at batch `b` is exact.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import numpy as np
import torch

ORDER_BLOCK_ROWS = 1024  # also the row-group size the Parquet writer uses, so a block is one row group


class RowSource(Protocol):
    """Rows of one split, readable by range: an in-memory split or a Parquet reader."""

    @property
    def num_rows(self) -> int: ...

    def read_rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def seeded_generator(*key: int) -> torch.Generator:
    """A torch generator seeded by a tuple of ints (seed, epoch, ...), the same in every process."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def batches_per_epoch(num_rows: int, batch_size: int, world_size: int) -> int:
    """Full micro-batches each rank gets per epoch (every rank the same number: DDP needs it)."""
    return (num_rows // world_size) // batch_size


class EpochOrder:
    """The permuted order of one epoch, computed per block so that it never materialises N indices."""

    def __init__(self, num_rows: int, seed: int, epoch: int) -> None:
        self.num_rows, self.seed, self.epoch = num_rows, seed, epoch
        num_blocks = -(-num_rows // ORDER_BLOCK_ROWS)
        self.blocks = torch.randperm(num_blocks, generator=seeded_generator(seed, epoch)).tolist()
        sizes = [min(ORDER_BLOCK_ROWS, num_rows - b * ORDER_BLOCK_ROWS) for b in self.blocks]
        self.ends = np.cumsum(sizes).tolist()  # position just past each block in the epoch's order

    def locate(self, position: int) -> tuple[int, int]:
        """(index into self.blocks, offset inside that block) of a position in the epoch's order."""
        j = bisect.bisect_right(self.ends, position)
        return j, position - (self.ends[j - 1] if j else 0)

    def block_rows(self, j: int, source: RowSource) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the j-th block of this epoch, in their permuted order."""
        block = self.blocks[j]
        start = block * ORDER_BLOCK_ROWS
        x, y = source.read_rows(start, min(start + ORDER_BLOCK_ROWS, self.num_rows))
        perm = torch.randperm(x.shape[0], generator=seeded_generator(self.seed, self.epoch, block + 1))
        return x[perm], y[perm]


def shard_batches(
    source: RowSource, *, seed: int, epoch: int, rank: int, world_size: int, batch_size: int, start_batch: int = 0
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (batch_index, x, y) for this rank's shard of the epoch, starting at `start_batch`.

    The next block is read on a background thread while the current one is trained on (at most two blocks in
    memory), so a streamed source does not make the step wait; the rows and their order are unchanged.
    """
    order = EpochOrder(source.num_rows, seed, epoch)
    per_rank = source.num_rows // world_size
    n_batches = batches_per_epoch(source.num_rows, batch_size, world_size)
    last_block = order.locate(rank * per_rank + n_batches * batch_size - 1)[0] if n_batches else -1
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
    pending: dict[int, Future] = {}

    def block(j: int) -> tuple[torch.Tensor, torch.Tensor]:
        future = pending.pop(j, None) or pool.submit(order.block_rows, j, source)
        if j + 1 <= last_block and j + 1 not in pending:
            pending[j + 1] = pool.submit(order.block_rows, j + 1, source)
        return future.result()

    try:
        cached: tuple[int, torch.Tensor, torch.Tensor] | None = None
        for b in range(start_batch, n_batches):
            position, stop = rank * per_rank + b * batch_size, rank * per_rank + (b + 1) * batch_size
            xs, ys = [], []
            while position < stop:
                j, offset = order.locate(position)
                if cached is None or cached[0] != j:
                    cached = (j, *block(j))
                take = min(stop - position, cached[1].shape[0] - offset)
                xs.append(cached[1][offset:offset + take])
                ys.append(cached[2][offset:offset + take])
                position += take
            yield b, torch.cat(xs) if len(xs) > 1 else xs[0], torch.cat(ys) if len(ys) > 1 else ys[0]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def eval_batches(
    source: RowSource, *, rank: int, world_size: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's contiguous share of a split, in file order; every row is seen by exactly one rank."""
    n = source.num_rows
    start, stop = rank * n // world_size, (rank + 1) * n // world_size
    for lo in range(start, stop, batch_size):
        yield source.read_rows(lo, min(lo + batch_size, stop))

