"""What every benchmark result carries: the machine, the versions, the command and the date."""
from __future__ import annotations

import resource
import time

# the result writer and the cache location live in the library (fastload._results); the
# harness re-exports them under their old names
from fastload._results import (cache_home, default_results_dir, machine_info,  # noqa: F401
                               publish_latest, run_stamp, versions, write_result)


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User+system CPU time of this process and its waited-for children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
