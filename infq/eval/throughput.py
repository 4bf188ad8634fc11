"""Process-level measurements shared by the commands that report speed and memory.

`peak_rss_bytes` is the high-water mark of this process's resident memory. It reads `VmHWM` from
/proc/self/status where Linux provides it: that belongs to the process's own address space.
`getrusage().ru_maxrss`, the portable fallback, is carried across execve, so a process started
from a large parent (a benchmark that has just built a model, a notebook) would report the
parent's peak instead of its own.
"""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024  # kB
        except OSError:
            pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
