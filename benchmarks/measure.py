"""Wall time and resident memory of a block of work, for the benchmark scripts (Linux /proc)."""

from __future__ import annotations

import json
import os
import statistics
import time


def rss_mib(field: str = "VmRSS") -> float:
    """A memory field of /proc/self/status in MiB: VmRSS now, or VmHWM, the peak since start or reset."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def median_ms(f, repeats: int = 5) -> float:
    """Milliseconds of ``f()``, the median of ``repeats`` calls after one warm-up call."""
    f()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


class Meter:
    """Wall time and peak resident memory above the starting point of one block."""

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
            f.write("5")
        self.base = rss_mib()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.peak = rss_mib("VmHWM") - self.base


def emit(lines: list[str], out: str | None, numbers=None) -> None:
    """Print a markdown table and, with ``out``, write it there (and ``numbers``, if given, as JSON beside it)."""
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
        if numbers is not None:
            with open(os.path.splitext(out)[0] + ".json", "w") as f:
                json.dump(numbers, f, indent=1)
