"""How one expert's weight matrices are packed into a single flat buffer.

An expert that lives in one contiguous buffer moves host->device with one copy at full bandwidth (the idea of
mixtral-offloading's expert wrapper). The layout records each matrix's name, shape and offset, so that a flat
buffer, on the host or in a GPU cache slot, is read back as views without copying.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

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


def _aligned(offset: int, to: int = 16) -> int:
    return -(-offset // to) * to


@dataclass(frozen=True)
class QuantizedLayout:
    """One expert of `full` quantized group-wise (`moeoffload.quantize`), packed into one flat uint8 buffer: per
    matrix its codes, then its float32 scales, then its uint8 zero points, each section 16-byte aligned. It reads
    like an ExpertLayout (`numel`, `nbytes`, `dtype`, `views`, `pack`), so an ExpertStore and an ExpertCache hold
    quantized experts unchanged: one copy per expert, of the quantized bytes."""

    full: ExpertLayout
    bits: int
    group: int

    def __post_init__(self) -> None:
        _ = self.groups  # refuses a tensor that is not a matrix or a column count no group divides

    @cached_property
    def groups(self) -> dict[str, int]:
        """The group size of each matrix (`quantize.group_for`)."""
        from .quantize import group_for

        return {name: group_for(name, shape, self.group) for name, shape in zip(self.full.names, self.full.shapes)}

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    @cached_property
    def sections(self) -> tuple[tuple[str, int, tuple[int, ...], torch.dtype], ...]:
        """(section name, byte offset, shape, dtype) of every section in packing order."""
        out, offset, group = [], 0, self.groups
        for name, (rows, cols) in zip(self.full.names, self.full.shapes):
            groups = (rows, cols // group[name])
            for suffix, shape, dtype in (("", (rows, cols * self.bits // 8), torch.uint8),
                                         (".scale", groups, torch.float32), (".zero", groups, torch.uint8)):
                out.append((name + suffix, offset, shape, dtype))
                offset = _aligned(offset + math.prod(shape) * torch.empty((), dtype=dtype).element_size())
        return tuple(out)

    @property
    def numel(self) -> int:
        name, offset, shape, dtype = self.sections[-1]
        return _aligned(offset + math.prod(shape) * torch.empty((), dtype=dtype).element_size())

    @property
    def nbytes(self) -> int:
        return self.numel

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of the uint8 buffer `flat` as every section (codes under the matrix's name); no copy."""
        out = {}
        for name, offset, shape, dtype in self.sections:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            out[name] = flat[offset : offset + size].view(dtype).view(shape)
        return out

    def pack(self, tensors: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Quantize the named full-precision matrices (on their own device) into the flat buffer `out`."""
        from .quantize import quantize

        views, group = self.views(out), self.groups
        for name, shape in zip(self.full.names, self.full.shapes):
            src = tensors[name]
            if tuple(src.shape) != tuple(shape):
                raise ValueError(f"expert matrix {name!r} has shape {tuple(src.shape)}, layout expects {shape}")
            for suffix, part in zip(("", ".scale", ".zero"), quantize(src, self.bits, group[name])):
                views[name + suffix].copy_(part)
        return out

    def dequantize(self, q: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
        """Write the expert whose sections are `q` (`views` of its buffer) into `out`, the full layout's views."""
        from .quantize import dequantize

        for name, group in self.groups.items():
            dequantize(q[name], q[name + ".scale"], q[name + ".zero"], self.bits, group, out=out[name])
