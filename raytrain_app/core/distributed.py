"""torch.distributed helpers that are no-ops in a single process, and device values read without a sync."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(obj: Any) -> list[Any]:
    if world()[1] == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


class LazyHostValue:
    """A device scalar copied to the host without waiting: `read()` gives the newest copy the device has
    finished (on CPU, the value just pushed). On CUDA it may lag a step or two."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.int64) -> None:
        self.asynchronous = device.type == "cuda"
        self.host = torch.zeros((), dtype=dtype, pin_memory=self.asynchronous)
        self.new_event: Any = torch.cuda.Event if self.asynchronous else None
        self.event: Any = None
        self.value: int | float | None = None

    def push(self, value: torch.Tensor) -> None:
        if not self.asynchronous:
            self.value = value.item()
            return
        if self.event is not None and not self.event.query():
            return  # the previous copy is still in flight: keep it
        self._collect()
        self.host.copy_(value, non_blocking=True)
        self.event = self.new_event()
        self.event.record()

    def _collect(self) -> None:
        if self.event is not None and self.event.query():
            self.value, self.event = self.host.item(), None

    def read(self) -> int | float | None:
        if self.asynchronous:
            self._collect()
        return self.value

