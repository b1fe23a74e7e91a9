"""Device views of page-locked host memory, so that a kernel's own loads can read experts from the host store.

The store's slabs are registered with cudaHostRegister (default flags), which on a system with unified virtual
addressing maps them into the device's address space too. A CUDA tensor over that mapping lets a Triton kernel
stream an expert across PCIe and write it into a cache slot in the same launch: no copy engine, and no host that
must first learn which expert to copy (`moeoffload.directory`).
"""

from __future__ import annotations

import ctypes
import functools

import torch

CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM = 91  # cudaDeviceAttr


@functools.cache
def _cudart() -> ctypes.CDLL | None:
    """The CUDA runtime torch loaded (its bindings expose neither cudaHostGetDevicePointer nor the attribute)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart" in line}
    except OSError:
        paths = set()
    for name in sorted(paths) + ["libcudart.so", "libcudart.so.13", "libcudart.so.12"]:
        try:
            lib = ctypes.CDLL(name)
            lib.cudaHostGetDevicePointer  # noqa: B018 (probe)
            return lib
        except (OSError, AttributeError):
            continue
    return None


def host_pointer_usable(device: torch.device) -> bool:
    """True when kernels on `device` may use a registered host pointer as it is (the device pointer equals it)."""
    lib = _cudart()
    if lib is None or device.type != "cuda":
        return False
    value = ctypes.c_int(0)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if lib.cudaDeviceGetAttribute(ctypes.byref(value), CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM, index) != 0:
        return False
    return bool(value.value)


def device_pointer(host: torch.Tensor) -> int:
    """The device address of a registered host tensor's first element (cudaHostGetDevicePointer)."""
    lib = _cudart()
    if lib is None:
        raise RuntimeError("the CUDA runtime library could not be found in this process; import torch with CUDA first")
    out = ctypes.c_void_p(0)
    code = lib.cudaHostGetDevicePointer(ctypes.byref(out), ctypes.c_void_p(host.data_ptr()), 0)
    if code != 0 or not out.value:
        lib.cudaGetLastError()
        raise RuntimeError(f"cudaHostGetDevicePointer failed (cudaError {code}): is the tensor page-locked with "
                           "cudaHostRegister (ExpertStore(pin_memory=True))?")
    return int(out.value)


class _Mapped:
    """A __cuda_array_interface__ over a device address; holds the host tensor so its memory outlives the view."""

    def __init__(self, host: torch.Tensor, address: int):
        self.host = host
        self.__cuda_array_interface__ = {"shape": (host.numel() * host.element_size() // 2,), "typestr": "<i2",
                                         "data": (address, False), "version": 3, "strides": None}


def device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor aliasing the registered, contiguous host tensor `host` (same dtype and numel): reads and writes
    through it cross PCIe. The host tensor must stay registered while the view is used."""
    if not host.is_contiguous() or (host.numel() * host.element_size()) % 2:
        raise ValueError("device_view needs a contiguous host tensor of a whole number of 16-bit words")
    view = torch.as_tensor(_Mapped(host, device_pointer(host)), device=device)
    return view.view(host.dtype).view(host.shape)
