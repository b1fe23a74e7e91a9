"""ExpertStore: every expert's weights in host memory, one contiguous buffer per expert.

The buffers are pinned (page-locked) when CUDA is present, because only pinned memory copies to the GPU
asynchronously and at the link's full rate (on the lent H100: 54 GB/s pinned against 7 GB/s pageable).
All experts of a model share one layout, so one expert is one copy of `layout.nbytes` bytes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .layout import ExpertLayout

ExpertKey = tuple[int, int]  # (MoE layer index, expert index)


class ExpertStore:
    """Host-side home of the experts. Read-only after it is filled; the cache copies from it."""

    def __init__(self, layout: ExpertLayout, num_layers: int, num_experts: int, pin_memory: bool | None = None):
        self.layout = layout
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.pinned = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._buffers: dict[ExpertKey, torch.Tensor] = {}

    def _new_buffer(self) -> torch.Tensor:
        return torch.empty(self.layout.numel, dtype=self.layout.dtype, pin_memory=self.pinned)

    def put(self, key: ExpertKey, tensors: dict[str, torch.Tensor]) -> None:
        """Pack one expert's matrices (any device) into its host buffer."""
        self._check_key(key)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._new_buffer()
        self.layout.pack({k: v.detach() for k, v in tensors.items()}, buf)
        self._buffers[key] = buf

    def buffer(self, key: ExpertKey) -> torch.Tensor:
        try:
            return self._buffers[key]
        except KeyError:
            self._check_key(key)
            raise KeyError(f"expert {key} was never stored; call ExpertStore.put first") from None

    def views(self, key: ExpertKey) -> dict[str, torch.Tensor]:
        return self.layout.views(self.buffer(key))

    def drop_layer(self, layer: int) -> None:
        """Free one MoE layer's host buffers (unload does this layer by layer, so that a model as large as the
        host's memory never exists twice: once restored, once still stored)."""
        for key in [k for k in self._buffers if k[0] == layer]:
            del self._buffers[key]

    def clear(self) -> None:
        """Drop every host buffer (after the experts went back into the model)."""
        self._buffers.clear()

    def keys(self) -> Iterator[ExpertKey]:
        return iter(sorted(self._buffers))

    def __len__(self) -> int:
        return len(self._buffers)

    @property
    def expert_bytes(self) -> int:
        return self.layout.nbytes

    @property
    def total_bytes(self) -> int:
        return self.num_layers * self.num_experts * self.layout.nbytes

    def _check_key(self, key: ExpertKey) -> None:
        layer, expert = key
        if not (0 <= layer < self.num_layers and 0 <= expert < self.num_experts):
            raise KeyError(
                f"expert {key} is outside this store: layers 0..{self.num_layers - 1}, "
                f"experts 0..{self.num_experts - 1}"
            )
