"""Interrupts at optimizer-step boundaries, and how every rank agrees on one."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

# What an interrupt function may ask for, polled at every optimizer-step boundary; the ranks act on the
# largest value any of them saw, so they all save and stop at the same step.
CONTINUE, SAVE, STOP = 0, 1, 2  # SAVE: checkpoint this step and go on (preemption notice); STOP: save, return


InterruptFn = Callable[[], int]


class Agreement:
    """What every rank acts on at a step boundary: the largest interrupt code any rank saw, whether any rank
    saw the run diverge, and whether every rank has written its part of the checkpoint in flight. One tiny
    all-reduce per optimizer step, on a gloo group: a CPU collective, so no GPU sync on the training path."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.group = (dist.new_group(backend="gloo")
                      if world_size > 1 and dist.get_backend() != "gloo" else None)

    def agree(self, code: int, *, diverged: bool, written: bool) -> tuple[int, bool, bool]:
        """(code, diverged, written) as every rank will act on them."""
        if self.world_size == 1:
            return code, diverged, written
        t = torch.tensor([code, int(diverged), int(not written)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t[0]), bool(t[1]), not t[2]
