"""Peak resident memory of a piece of work, on Linux: the kernel's high-water mark (VmHWM), reset just before it.

``ru_maxrss`` cannot be reset, so in a process that imported torch and transformers its peak is often the import's;
writing 5 to /proc/self/clear_refs resets VmHWM to the current resident size.
"""

from __future__ import annotations


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def start() -> int:
    """Reset the peak; return the resident bytes now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def growth_since(base: int) -> int:
    """Peak resident bytes since start(), above what was resident then."""
    return max(0, _status_kib("VmHWM") * 1024 - base)
