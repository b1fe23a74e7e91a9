"""How one expert's weight matrices are packed into a single flat buffer.

An expert that lives in one contiguous buffer moves host->device with one copy at full bandwidth (the idea of
mixtral-offloading's expert wrapper). The layout records each matrix's name, shape and offset, so that a flat
buffer, on the host or in a GPU cache slot, is read back as views without copying.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertLayout:
    """Named matrices of one expert, in packing order, and their common dtype."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.numels)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of `flat` (shape [numel]) as the named matrices; no copy."""
        out, offset = {}, 0
        for name, shape, n in zip(self.names, self.shapes, self.numels):
            out[name] = flat[offset : offset + n].view(shape)
            offset += n
        return out

    def pack(self, tensors: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Copy the named matrices into the flat buffer `out`."""
        for name, view in self.views(out).items():
            src = tensors[name]
            if tuple(src.shape) != tuple(view.shape):
                raise ValueError(
                    f"expert matrix {name!r} has shape {tuple(src.shape)}, layout expects {tuple(view.shape)}"
                )
            view.copy_(src)
        return out
