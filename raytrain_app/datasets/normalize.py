"""Per-feature statistics of a training split, for --normalize standard.

Read one block of rows at a time (bounded memory, streamed for Parquet) and combined with Chan et al.'s pairwise
update in file order, in float64 with numpy (single-threaded reductions): the same rows always give the same
bits, whatever the machine's thread count, and a pickle and its Parquet copy give the same statistics.
"""

from __future__ import annotations

import numpy as np
import torch

from raytrain_app.datasets.order import ORDER_BLOCK_ROWS, RowSource


def feature_stats(source: RowSource, block_rows: int = ORDER_BLOCK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of every feature over all rows and steps of `source`, float64 [F]. The std is the population
    std; a constant feature gets 1 (its standardised value is then 0 - no division by zero)."""
    count, mean, m2 = 0, None, None
    for start in range(0, source.num_rows, block_rows):
        x, _ = source.read_rows(start, min(start + block_rows, source.num_rows))
        values = x.numpy().reshape(-1, x.shape[-1]).astype(np.float64)
        n = values.shape[0]
        block_mean = values.mean(axis=0)
        block_m2 = ((values - block_mean) ** 2).sum(axis=0)
        if mean is None:
            count, mean, m2 = n, block_mean, block_m2
            continue
        delta, total = block_mean - mean, count + n
        mean = mean + delta * (n / total)
        m2 = m2 + block_m2 + delta**2 * (count * n / total)
        count = total
    if mean is None:
        raise ValueError("no rows to compute feature statistics from")
    std = np.sqrt(m2 / count)
    std = np.where(std > 0, std, 1.0)
    return torch.from_numpy(mean), torch.from_numpy(std)
