"""Process-wide memory settings: message-sized buffers off the heap, no collection at exit.

Keep message-sized buffers off the heap, so memory stays flat over long runs (rule 8).

glibc raises its mmap threshold each time a large mmapped block is freed; after a few
big messages, message-sized buffers are carved from the heap instead, the heap
fragments across threads, and the resident size climbs with every batch. A fixed
threshold keeps each buffer over 1 MiB in its own mapping, returned to the system when
freed. Measured on the benchmark corpus: peak RSS 183 MB -> 116 MB. A no-op elsewhere.

No garbage collection at exit: after the last atexit handler Python collects and tears
down everything the process still holds (SQLAlchemy, pydantic and the rest), which took
0.2 s of a 1.6 s no-change `sync` of 100 accounts; with every object frozen, 0.06 s.
What must outlive the process is committed to the ledger before it exits, and the
system takes back the memory.
"""
from __future__ import annotations

import atexit
import ctypes
import gc

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def keep_large_buffers_off_the_heap(threshold: int = 1 << 20) -> bool:
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def no_collection_at_exit() -> None:
    """Call once at start: the objects are frozen at exit, before the final collection."""
    atexit.register(gc.freeze)
