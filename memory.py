"""Per-step measurements for distill.py's log and bench.py's tables: peak memory, phase times.

    start_memory_window(device) -> bytes in use now (the window's baseline); the peak is reset
    peak_memory(device)         -> the peak since start_memory_window, bytes (nan where unknown)
    with phase(times, name, device): ...   adds the block's wall time to times[name]

CUDA: the caching allocator's counters (tensors only). CPU, by platform:
- Linux: the process's peak resident set (VmHWM in /proc/self/status), reset per window by writing
  "5" to /proc/self/clear_refs, so each step reports its own peak.
- macOS and other Unixes (or a Linux whose /proc cannot be written): getrusage's ru_maxrss, the
  peak since the process started; it cannot be reset, so a step reports the largest peak so far.
- Windows (no `resource` module): unknown, reported as nan.
"""
import contextlib
import math
import sys
import time

import torch


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
