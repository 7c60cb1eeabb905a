"""Which malloc this process runs on, read from its own memory map.

On CPU, glibc's malloc hands PyTorch's large activation buffers back to the kernel after each
forward and page-faults them in again on the next; tcmalloc keeps them (figures in docs/scorer.md,
"Memory allocator, measured"). The CPU image preloads it; a process started elsewhere says which
allocator it got, so an operator can tell.
"""

from __future__ import annotations

from pathlib import Path

# Allocators that replace malloc when preloaded (LD_PRELOAD) or linked in; glibc's is the fallback.
KNOWN = ("tcmalloc", "jemalloc", "mimalloc")
HINT = (
    "on CPU, tcmalloc saves the page faults glibc's malloc takes on every forward: preload it with "
    "LD_PRELOAD=<path to libtcmalloc_minimal.so.4> (Debian/Ubuntu: libtcmalloc-minimal4; docs/scorer.md)"
)


def allocator_in(maps: str) -> str:
    """The allocator library mapped in a /proc/<pid>/maps text ("tcmalloc", ...), else "glibc"."""
    for line in maps.splitlines():
        name = line.rsplit("/", 1)[-1] if "/" in line else ""
        for allocator in KNOWN:
            if name.startswith(f"lib{allocator}"):
                return allocator
    return "glibc"


def current_allocator() -> str:
    """This process's allocator; "unknown" where /proc cannot be read (not Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    return allocator_in(maps)
