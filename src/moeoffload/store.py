"""ExpertStore: every expert's weights in host memory, one contiguous slab per MoE layer.

The slabs are page-locked when CUDA is present, because only page-locked memory copies to the GPU asynchronously and
at the link's full rate (on an H100 80GB HBM3: 54.3 GB/s pinned against 7.4 GB/s pageable, docs/design.md). They are
ordinary host allocations locked with cudaHostRegister, not torch's pinned tensors: torch's pinned allocator rounds
every block up to a power of two, so a 336 MiB Mixtral-8x7B expert would take 512 MiB and the model's 87 GiB of
experts 128 GiB. A slab holds exactly `num_experts * layout.nbytes` bytes; expert e of a layer is the 1-D view at
offset `e * layout.numel`, so one expert is still one copy of `layout.nbytes` bytes.

A layer's slab is allocated on the first `put` into that layer and freed (unlocked first) by `drop_layer`, so
that `offload`/`unload`, which move experts layer by layer, never hold a model as large as host memory twice.

Low-precision copies (`low_precision("int8" | "int4")`) are stores of their own beside this one, made once from it
when a policy first asks for them: the same keys, one contiguous quantized buffer per expert
(`layout.QuantizedLayout`), so a cache copies an expert's quantized bytes with one copy.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Iterator
from typing import Protocol

import torch

from .errors import HostMemoryError
from .layout import ExpertLayout, QuantizedLayout

ExpertKey = tuple[int, int]  # (MoE layer index, expert index)

GIB = 1 << 30


class HostRegister(Protocol):
    """Page-locks host memory for the device: `register` returns an error code (0 or None on success)."""

    def register(self, ptr: int, nbytes: int) -> int | None: ...

    def unregister(self, ptr: int) -> int | None: ...


class CudaHostRegister:
    """cudaHostRegister / cudaHostUnregister through torch's bindings of the CUDA runtime."""

    def register(self, ptr: int, nbytes: int) -> int:
        code = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))
        if code:
            _clear_last_cuda_error()  # else the next kernel launch check reports this failure as its own
        return code

    def unregister(self, ptr: int) -> int:
        torch.cuda.synchronize()  # no copy still in flight may read pages that are about to become pageable
        return int(torch.cuda.cudart().cudaHostUnregister(ptr))

    @staticmethod
    def describe(code: int) -> str:
        try:
            cudart = torch.cuda.cudart()
            return f"{cudart.cudaGetErrorString(cudart.cudaError(code))}, cudaError {code}"
        except (TypeError, ValueError, RuntimeError, AttributeError):
            return f"cudaError {code}"


def _clear_last_cuda_error() -> None:
    """Reset the CUDA runtime's last error, which torch's bindings do not expose; best effort through the runtime
    library torch already loaded."""
    try:
        ctypes.CDLL(None).cudaGetLastError()
    except (AttributeError, OSError):
        pass


def _unregister_all(host_register: HostRegister, slabs: dict[int, torch.Tensor]) -> None:
    """Finalizer of a store collected without clear(): unlock every slab before its memory goes."""
    for layer in list(slabs):
        slab = slabs.pop(layer)
        try:
            host_register.unregister(slab.data_ptr())
        except Exception:  # a finalizer must not raise; the pages unlock at process exit anyway
            pass


class ExpertStore:
    """Host-side home of the experts. Read-only after it is filled; the cache copies from it.

    `host_register` page-locks the slabs when the store is pinned (default: cudaHostRegister); every slab it
    registers is unregistered exactly once, by `drop_layer`, `clear`, or when the store is garbage-collected.
    """

    def __init__(self, layout: ExpertLayout | QuantizedLayout, num_layers: int, num_experts: int,
                 pin_memory: bool | None = None, host_register: HostRegister | None = None):
        self.layout = layout
        self._copies: dict[str, ExpertStore] = {}  # precision -> the quantized copies of every expert
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.pinned = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._buffers: dict[ExpertKey, torch.Tensor] = {}
        self._slabs: dict[int, torch.Tensor] = {}  # layer -> its experts, page-locked when pinned
        self._host_register: HostRegister | None = None
        if self.pinned:
            self._host_register = host_register if host_register is not None else CudaHostRegister()
            finalizer = weakref.finalize(self, _unregister_all, self._host_register, self._slabs)
            finalizer.atexit = False  # at exit the process's pages unlock anyway, and CUDA may be gone

    def _new_slab(self, layer: int) -> torch.Tensor:
        """Allocate and page-lock one layer's slab; on failure raise with nothing kept."""
        nbytes = self.num_experts * self.layout.nbytes
        try:
            slab = torch.empty(self.num_experts * self.layout.numel, dtype=self.layout.dtype)
        except RuntimeError as e:
            raise HostMemoryError(f"could not allocate {nbytes / GIB:.2f} GiB of host memory for MoE layer {layer} "
                                  f"({e}); free host memory or use a smaller model") from None
        if self._host_register is not None and nbytes:
            code = self._host_register.register(slab.data_ptr(), nbytes)
            if code:
                describe = getattr(self._host_register, "describe", None)
                reason = describe(code) if describe is not None else f"error {code}"
                raise HostMemoryError(
                    f"could not page-lock {nbytes / GIB:.2f} GiB for MoE layer {layer} ({reason}; "
                    f"{self.pinned_bytes / GIB:.2f} GiB of this store already locked, "
                    f"{self.total_bytes / GIB:.2f} GiB in all): the host's lockable memory limit (`ulimit -l`) or "
                    "its free memory is too small; raise the limit, use a smaller model, or build the ExpertStore "
                    "with pin_memory=False (slower, synchronous copies)"
                )
        self._slabs[layer] = slab
        return slab

    def _release_slab(self, layer: int) -> None:
        slab = self._slabs.pop(layer, None)
        if slab is not None and self._host_register is not None and slab.numel():
            self._host_register.unregister(slab.data_ptr())

    def put(self, key: ExpertKey, tensors: dict[str, torch.Tensor]) -> None:
        """Pack one expert's matrices (any device) into its place in the layer's slab."""
        self._check_key(key)
        layer, expert = key
        slab = self._slabs.get(layer)
        fresh = slab is None
        if slab is None:
            slab = self._new_slab(layer)
        n = self.layout.numel
        buf = slab[expert * n : (expert + 1) * n]
        try:
            self.layout.pack({k: v.detach() for k, v in tensors.items()}, buf)
        except Exception:
            if fresh:
                self._release_slab(layer)
            raise
        self._buffers[key] = buf

    def allocate_layer(self, layer: int) -> torch.Tensor:
        """One MoE layer's slab (page-locked when the store is pinned) with every expert's buffer a view of it, for
        the caller to fill in place: a checkpoint reader or a seeded benchmark writes a model larger than one
        host copy without packing each expert through `put`."""
        self._check_key((layer, 0))
        slab = self._slabs.get(layer) or self._new_slab(layer)
        n = self.layout.numel
        for e in range(self.num_experts):
            self._buffers[(layer, e)] = slab[e * n : (e + 1) * n]
        return slab

    def buffer(self, key: ExpertKey) -> torch.Tensor:
        try:
            return self._buffers[key]
        except KeyError:
            self._check_key(key)
            raise KeyError(f"expert {key} was never stored; call ExpertStore.put first") from None

    def slab(self, layer: int) -> torch.Tensor:
        """One MoE layer's experts as one 1-D tensor, expert e at offset `e * layout.numel` (what a kernel that
        fetches experts by index reads). Raises when the layer's buffers are not laid out that way."""
        slab = self._slabs.get(layer)
        if slab is not None:
            return slab
        first = self.buffer((layer, 0))
        n = self.layout.numel
        for e in range(self.num_experts):
            buf = self.buffer((layer, e))
            if buf.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or \
                    buf.storage_offset() != first.storage_offset() + e * n:
                raise ValueError(f"the experts of MoE layer {layer} are not one contiguous slab in expert order; "
                                 "fill the store with ExpertStore.put")
        return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (self.num_experts * n,), (1,))

    def views(self, key: ExpertKey) -> dict[str, torch.Tensor]:
        return self.layout.views(self.buffer(key))

    def low_precision(self, precision: str, device: torch.device | str | None = None) -> ExpertStore:
        """The store of every expert quantized to `precision` ("int8", "int4"), made on the first call and kept
        (`drop_low_precision` frees it). `device`: where the quantization runs (a GPU quantizes a published-size
        model in seconds); the copies live in host memory, page-locked like this store."""
        from .quantize import BITS, GROUP_SIZE

        found = self._copies.get(precision)
        if found is not None:
            return found
        if precision not in BITS:
            raise ValueError(f"precision {precision!r} is unknown; use one of {', '.join(BITS)}")
        if isinstance(self.layout, QuantizedLayout):
            raise ValueError("this store already holds quantized experts; ask the full-precision store")
        layout = QuantizedLayout(self.layout, BITS[precision], GROUP_SIZE)
        copy = ExpertStore(layout, self.num_layers, self.num_experts, pin_memory=self.pinned,
                           host_register=self._host_register)
        for key in self.keys():
            views = self.views(key)
            copy.put(key, views if device is None else {k: v.to(device) for k, v in views.items()})
        self._copies[precision] = copy
        return copy

    @property
    def full_layout(self) -> ExpertLayout:
        """The layout of one expert at full precision (this store's own, or the one its quantized copies encode)."""
        return self.layout.full if isinstance(self.layout, QuantizedLayout) else self.layout

    @property
    def low_precisions(self) -> tuple[str, ...]:
        """The precisions whose copies are made (and held in host memory) now."""
        return tuple(self._copies)

    def drop_low_precision(self, precision: str) -> None:
        """Free the `precision` copies (a no-op when none were made)."""
        copy = self._copies.pop(precision, None)
        if copy is not None:
            copy.clear()

    def drop_layer(self, layer: int) -> None:
        """Free one MoE layer's slab (unload does this layer by layer, so that a model as large as the host's
        memory never exists twice: once restored, once still stored). Its pages are unlocked first; the layer's
        low-precision copies go with it."""
        for copy in self._copies.values():
            copy.drop_layer(layer)
        for key in [k for k in self._buffers if k[0] == layer]:
            del self._buffers[key]
        self._release_slab(layer)

    def clear(self) -> None:
        """Drop every host buffer (after the experts went back into the model)."""
        for precision in list(self._copies):
            self.drop_low_precision(precision)
        self._buffers.clear()
        for layer in list(self._slabs):
            self._release_slab(layer)

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

    @property
    def pinned_bytes(self) -> int:
        """Bytes this store holds page-locked now (whole slabs: a layer is locked from its first put)."""
        if self._host_register is None:
            return 0
        return sum(slab.numel() * slab.element_size() for slab in self._slabs.values())

    def _check_key(self, key: ExpertKey) -> None:
        layer, expert = key
        if not (0 <= layer < self.num_layers and 0 <= expert < self.num_experts):
            raise KeyError(
                f"expert {key} is outside this store: layers 0..{self.num_layers - 1}, "
                f"experts 0..{self.num_experts - 1}"
            )
