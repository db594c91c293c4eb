"""Per-step measurements for distill.py's log and bench.py's tables: peak memory, phase times.

    start_memory_window(device) -> bytes in use now (the window's baseline); the peak is reset
    peak_memory(device)         -> the peak since start_memory_window, bytes (nan where unknown)
    with phase(times, name, device): ...   adds the block's wall time to times[name]
    with HeapPeak() as h: ...   h.peak: the most bytes malloc'd at once, at aten-op boundaries
    with keep_freed_memory(): ...   glibc's malloc reuses freed memory (no page faults)
    minor_page_faults()         -> this process's page faults so far

CUDA: the caching allocator's counters (tensors only). CPU, by platform:
- Linux: the process's peak resident set (VmHWM in /proc/self/status), reset per window by writing
  "5" to /proc/self/clear_refs, so each step reports its own peak.
- macOS and other Unixes (or a Linux whose /proc cannot be written): getrusage's ru_maxrss, the
  peak since the process started; it cannot be reset, so a step reports the largest peak so far.
- Windows (no `resource` module): unknown, reported as nan.
"""
import contextlib
import ctypes
import math
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _proc_status_bytes(field):
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from Linux's /proc."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) * 1024


def _lifetime_peak_bytes():
    """Peak resident set since the process started (getrusage), or nan without `resource`."""
    try:
        import resource
    except ImportError:  # Windows
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; elsewhere: KiB


def minor_page_faults():
    """Page faults of this process so far that found their page in memory (first touches of
    freshly mapped pages among them), or nan without `resource`."""
    try:
        import resource
    except ImportError:  # Windows
        return math.nan
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def start_memory_window(device):
    """Reset the peak counter and return the memory in use now (the step's baseline), bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset this process's peak RSS (VmHWM) to its current RSS
        return _proc_status_bytes("VmRSS")
    except OSError:  # no /proc (macOS, Windows) or not writable: the lifetime peak stands in
        return _lifetime_peak_bytes()


def peak_memory(device):
    """The peak since start_memory_window, bytes (see the module docstring per platform)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        return _proc_status_bytes("VmHWM")
    except OSError:
        return _lifetime_peak_bytes()


@contextlib.contextmanager
def phase(times, name, device):
    """Add this block's wall time to times[name] (synchronising CUDA so the time is real)."""
    t0 = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()
    times[name] = times.get(name, 0.0) + time.perf_counter() - t0


class _MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (glibc >= 2.33)
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


try:
    _libc = ctypes.CDLL("libc.so.6")
except OSError:  # no glibc
    _libc = None
_mallinfo2 = getattr(_libc, "mallinfo2", None)  # None also on a glibc older than 2.33
if _mallinfo2 is not None:
    _mallinfo2.restype = _MallInfo2
_mallopt = getattr(_libc, "mallopt", None)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameters (glibc's malloc.h) and defaults:
_MALLOPT_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}


@contextlib.contextmanager
def keep_freed_memory():
    """Within the block glibc's malloc keeps what is freed for the next allocation, as a caching
    allocator does (PyTorch's own on a GPU; jemalloc or tcmalloc on a CPU): no block is mmapped
    (by default one over the mmap threshold, 128 KiB rising to 32 MiB, is, and is unmapped when
    freed) and the heap is not trimmed. A tensor allocated again after one of its size was freed
    then reuses pages already touched, where otherwise its first touch page-faults every 4 KiB page
    afresh. Not guaranteed: torch's 64-byte-aligned requests need a little more than the block
    they freed, so reuse waits for that block to merge with its free neighbours, which a repeated
    pattern of calls reaches after a warm-up call or two (and now and then loses for a call) and a
    one-off pattern may not; count the faults (minor_page_faults) to know. Yields whether it
    applies (False without glibc). On exit the defaults return; glibc's dynamic mmap threshold
    stays off (a fixed 128 KiB)."""
    if _mallopt is None:
        yield False
        return
    _mallopt(M_MMAP_MAX, 0)
    _mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)  # an int: 2 GiB of free heap top before a trim
    try:
        yield True
    finally:
        for param, value in _MALLOPT_DEFAULTS.items():
            _mallopt(param, value)


def _heap_in_use():
    """Bytes malloc'd and not yet freed (arena blocks in use + mmapped ones), or nan."""
    if _mallinfo2 is None:
        return math.nan
    info = _mallinfo2()
    return info.uordblks + info.hblkhd


class HeapPeak(TorchDispatchMode):
    """CPU: the block's peak of the C heap in use (tensors and kernels' own buffers alike), sampled
    before and after every aten op; .start is the heap at entry. Exact to the byte at op boundaries,
    where RSS moves in pages and with what the OS lends and takes back (about ±1% of a (256,
    151,936) fp32 tensor between repeats); a kernel's temporary freed within one op is not seen.
    Slow (a C call per op): for measurements, not training. nan without glibc."""

    def __enter__(self):
        self.start = self.peak = _heap_in_use()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.peak = max(self.peak, _heap_in_use())
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _heap_in_use())
        return out
