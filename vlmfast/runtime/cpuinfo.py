"""The first CPU's entry of /proc/cpuinfo: what names a CPU (model name, family, model) and its
instruction-set flags, for the bench's machine names and the GEMM choice cache's file names."""

KEYS = ("model name", "cpu family", "model", "flags")


def first_cpu() -> dict[str, str]:
    """{key: value} for KEYS as the first processor lists them; empty where /proc/cpuinfo is
    missing (not Linux) or unreadable."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in KEYS and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break  # the first processor's entry ends at its blank line
    except OSError:
        pass
    return fields
