"""Whether a process of this machine still exists: what a dead worker left behind (a lease,
a spool file) may be taken over or removed at once instead of waiting for it to expire."""
from __future__ import annotations

import os


def gone(pid: int) -> bool:
    """True when no process with this pid exists (in this PID namespace); one of another
    user, which may not be signalled, exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
