"""CUDA stream memory operations (cuStreamWaitValue32, cuStreamWriteValue32) through the driver library.

Why: with the cache's directory on the device (`moeoffload.directory`), a layer's fills are known only on the GPU,
yet they should move on the copy engine at the link's rate, not through the SMs' loads (52% of it on an H100 80GB
HBM3: benchmarks/RESULTS.md). A host thread learns each layer's fills and queues the copies (`moeoffload.courier`);
the compute stream must wait for copies that were not queued yet when the host launched the layer. An event cannot
express that (waiting on an event not yet recorded is a no-op); a stream wait on a 32-bit flag in device memory can:
the copy stream writes the flag after its copies, the compute stream waits until it reaches the layer's sequence
number. torch exposes neither operation, so they come from libcuda through ctypes.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

WAIT_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ: wait until (int32_t)(*addr - value) >= 0, safe across wrap-around
WRITE_DEFAULT = 0x0  # CU_STREAM_WRITE_VALUE_DEFAULT: a memory fence before the write, so the copies are visible


class _Driver(NamedTuple):
    lib: ctypes.CDLL
    wait: Callable[..., int]
    write: Callable[..., int]


@functools.cache
def _driver() -> _Driver | None:
    """libcuda and its two stream operations, or None where the driver or the functions are missing."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    found = []
    for name in ("cuStreamWaitValue32", "cuStreamWriteValue32"):
        fn = None
        for symbol in (f"{name}_v2", name):  # CUDA 12+ names the current ABI _v2; the plain one is the old API
            fn = getattr(lib, symbol, None)
            if fn is not None:
                break
        if fn is None:
            return None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        fn.restype = ctypes.c_int
        found.append(fn)
    return _Driver(lib, found[0], found[1])


def available(device: torch.device) -> bool:
    """True when stream memory operations work on `device`: tried once, on a scratch flag."""
    if device.type != "cuda" or _driver() is None:
        return False
    return _probe(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _probe(index: int) -> bool:
    device = torch.device("cuda", index)
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device)
    try:
        write_value(stream, flag, 7)
        wait_value(stream, flag, 7)
        stream.synchronize()
    except RuntimeError:
        return False
    return int(flag.item()) == 7


def as_uint32(seq: int) -> int:
    return seq & 0xFFFFFFFF


def as_int32(seq: int) -> int:
    """The int32 that holds `seq` modulo 2**32 (the value a kernel stores in the flag)."""
    seq = as_uint32(seq)
    return seq - (1 << 32) if seq >= 1 << 31 else seq


def reached(flag_value: int, seq: int) -> bool:
    """The wait's own test: (int32)(flag - seq) >= 0, so sequence numbers may wrap around."""
    return as_int32(flag_value - seq) >= 0


def _require() -> _Driver:
    driver = _driver()
    assert driver is not None, "stream memory operations need libcuda: check available() first"
    return driver


def _call(fn: Callable[..., int], stream: torch.cuda.Stream, flag: torch.Tensor, seq: int, flags: int,
          what: str) -> None:
    """Call a stream operation on `flag`, raising with the driver's error name."""
    code = fn(ctypes.c_void_p(stream.cuda_stream), ctypes.c_uint64(flag.data_ptr()), ctypes.c_uint32(as_uint32(seq)),
              ctypes.c_uint(flags))
    if code != 0:
        name = ctypes.c_char_p()
        _require().lib.cuGetErrorName(code, ctypes.byref(name))
        raise RuntimeError(f"{what} failed ({(name.value or b'?').decode()}, CUresult {code}); the driver does not "
                           "support stream memory operations here: use fetch='host'")


def bind_context(index: int) -> None:
    """Make device `index`'s primary context (torch's) current on the calling thread, if none is: a new thread has
    none until its first runtime call, and the driver's stream operations need one."""
    lib = _require().lib
    ctx = ctypes.c_void_p()
    if lib.cuCtxGetCurrent(ctypes.byref(ctx)) == 0 and ctx.value:
        return
    dev = ctypes.c_int()
    codes = [lib.cuDeviceGet(ctypes.byref(dev), index)]
    codes.append(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))  # torch holds it too: it outlives the thread
    codes.append(lib.cuCtxSetCurrent(ctx))
    if any(codes):
        raise RuntimeError(f"could not make device {index}'s context current on this thread (CUresult {codes})")


def wait_value(stream: torch.cuda.Stream, flag: torch.Tensor, seq: int) -> None:
    """Work queued on `stream` after this starts once the int32 `flag` (device memory) has reached `seq`."""
    _call(_require().wait, stream, flag, seq, WAIT_GEQ, "cuStreamWaitValue32")


def write_value(stream: torch.cuda.Stream, flag: torch.Tensor, seq: int) -> None:
    """Once the work queued on `stream` so far is done, set the int32 `flag` to `seq` (after a memory fence)."""
    _call(_require().write, stream, flag, seq, WRITE_DEFAULT, "cuStreamWriteValue32")
