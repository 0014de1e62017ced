"""What every benchmark prints about the machine it ran on (imported by the scripts beside it)."""

import os
import platform


def machine() -> str:
    """CPU model, logical cores, RAM and kernel, e.g. 'AMD EPYC ..., 2 logical cores, 23 GB RAM, Linux 6.1'."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} logical cores, {memory_gb:.0f} GB RAM, {platform.system()} {platform.release()}"
