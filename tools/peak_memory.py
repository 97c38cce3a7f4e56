"""Peak memory of a stretch of code, above the memory held when it starts.

    with PeakMemory("cpu") as mem:
        train_step()
    mem.peak_bytes, mem.base_bytes

CPU: the resident-set high-water mark (`resource.getrusage(RUSAGE_SELF).ru_maxrss`),
first lowered to the current resident set through /proc/self/clear_refs (Linux), so the
mark left by imports and by building the model does not hide a smaller peak. Measure in a
fresh process: the mark covers every thread, and memory the allocator kept from earlier
work is reused without showing. Under MALLOC_MMAP_MAX_=0 glibc never returns memory, so
`base_bytes` is also the heap the process had grown to. CUDA: torch's allocator,
`max_memory_allocated` over `memory_allocated` at the start (tensors only, not the
caching allocator's reserve or the CUDA context).
"""

from __future__ import annotations

import resource


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_rss_high_water_mark() -> bool:
    """Lower the resident-set high-water mark to the current resident set; False where
    the kernel does not offer it (the mark then keeps the process's earlier peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Context manager: `peak_bytes` (the high-water mark above `base_bytes`) once closed."""

    def __init__(self, device: str) -> None:
        self.cuda = str(device).startswith("cuda")
        self.base_bytes = self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.base_bytes = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_rss_high_water_mark()
            self.base_bytes = _max_rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            high = torch.cuda.max_memory_allocated()
        else:
            high = _max_rss_bytes()
        self.peak_bytes = high - self.base_bytes
