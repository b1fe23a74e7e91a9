"""TransferEngine: host->device copies of experts on a dedicated CUDA stream, ordered with events.

A copy into a cache slot waits for the event that says the last computation reading that slot is done, and
records an event that the computation waits for before it reads the new expert. The compute stream is never
blocked by the host; copies overlap compute whenever they were issued early enough (prefetch).
On a machine without CUDA the same calls copy synchronously, so byte accounting is identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TransferStats:
    copies: int = 0
    bytes: int = 0


class TransferEngine:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.stats = TransferStats()

    def copy(
        self, src: torch.Tensor, dst: torch.Tensor, after: torch.cuda.Event | None = None
    ) -> torch.cuda.Event | None:
        """Copy host `src` into device `dst`; return the event that marks its completion (None on a CPU).

        `after` is an event the copy must wait for (the slot's last reader finishing).
        """
        self.stats.copies += 1
        self.stats.bytes += src.numel() * src.element_size()
        if not self.cuda:
            dst.copy_(src)
            return None
        assert self.stream is not None
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def reset_stats(self) -> None:
        self.stats = TransferStats()
