"""Host allocator hygiene for long runs (glibc only; a no-op elsewhere).

The streamed stages allocate and free many medium-sized CPU tensors (a chunk of frames, flows, a decoded batch).
glibc serves those from mmap at first, but every free of such a block raises its mmap threshold, after which the
same sizes come from the heap, where freed chunks interleaved with live ones stay resident: measured at 320x192,
the ProPainter prior's private memory climbed by ~100 MB per propagation chunk although what it held was bounded.
``return_free_memory`` hands free heap pages back (``malloc_trim``); the prior calls it whenever it drops a chunk.
Measured (320x192, stand-in networks, bench/host_memory.py): the run's extra private memory went from 0.42 GB at
300 frames to 0.49 GB at 600 with it. Pinning the mmap threshold (``mallopt``) instead halved that growth but
cost minutes of system time in page faults on a CPU run, so it is not used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_libc = None
_looked_up = False


def _glibc():
    global _libc, _looked_up
    if not _looked_up:
        _looked_up = True
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                if hasattr(libc, "malloc_trim"):
                    _libc = libc
            except OSError:
                _libc = None
    return _libc


def return_free_memory() -> bool:
    """Give free heap memory back to the system; True when glibc did something."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))
