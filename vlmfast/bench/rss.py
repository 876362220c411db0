"""This process's resident memory on Linux, for the CPU memory cases of the benchmarks.

torch's CPU allocations are invisible to tracemalloc, so the suites read /proc/self/status:
VmRSS (now) and VmHWM (the high-water mark). Not ru_maxrss: Linux carries it over from the
parent across fork and exec, so a fresh child could report its parent's peak.
(generate_memory.py reads VmHWM itself: it runs by path and must not import the vlmfast package.)
"""


def status_mib(field: str) -> float:
    """A /proc/self/status field in MiB: "VmRSS" (resident now) or "VmHWM" (peak). OSError where
    there is no /proc, KeyError for an unknown field."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def reset_peak() -> None:
    """VmHWM := VmRSS, so the next reading of VmHWM is the peak from here on. OSError where
    /proc/self/clear_refs is missing or not writable."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
