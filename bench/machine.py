"""What the figures were measured on: the CPU, the memory, and what fresh memory costs here.

On a virtual machine whose host takes freed memory back (Linux's free page reporting,
as Firecracker's guests have), the first write to each page waits for the host to
provide it. Every file an ingest writes lands in new pages of the page cache, so on
such a machine storing a file costs that wait on top of the copy, for every server
measured; the two speeds below show how large it is at the time of the run.
"""

import mmap
import os
import platform
import time
from pathlib import Path

MB = 1024 * 1024
PAGE_REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")


def memory_write_speeds(megabytes: int = 256) -> tuple[float, float]:
    """MB/s writing a new anonymous mapping, then writing the same pages again."""
    chunk = b"\1" * MB
    speeds = []
    with mmap.mmap(-1, megabytes * MB) as memory:
        for _ in range(2):
            memory.seek(0)
            start = time.perf_counter()
            for _ in range(megabytes):
                memory.write(chunk)
            speeds.append(megabytes / (time.perf_counter() - start))
    return speeds[0], speeds[1]


def user_system_seconds(pids: list[int]) -> tuple[float, float]:
    """CPU seconds the processes spent in their own code (user) and in the kernel for them (system).

    A process that has exited counts for nothing.
    """
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:
            continue
        user, system = user + int(fields[11]), system + int(fields[12])
    ticks = os.sysconf("SC_CLK_TCK")
    return user / ticks, system / ticks


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds the processes have used, user and system together (user_system_seconds)."""
    return sum(user_system_seconds(pids))


def cpu_times() -> list[int]:
    """The machine's CPU times so far (/proc/stat's first line: user, nice, system, idle, iowait, ...)."""
    return [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def idle_shares(before: list[int], after: list[int]) -> dict[str, float]:
    """What share of the machine's CPU time between two cpu_times() was idle, and waiting for I/O."""
    spent = [b - a for a, b in zip(before, after, strict=True)]
    return {"idle": spent[3] / sum(spent), "iowait": spent[4] / sum(spent)}


def machine() -> dict:
    names = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    cpu = names[0].split(":", 1)[1].strip() if names else platform.processor()
    memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    fresh, again = memory_write_speeds()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_mb": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": Path("/proc/loadavg").read_text().split()[:3],
        "fresh_memory_mb_s": round(fresh),
        "written_memory_mb_s": round(again),
        # 2^order pages: freed blocks this large go back to the host; None without free page reporting.
        "page_reporting_order": int(PAGE_REPORTING_ORDER.read_text()) if PAGE_REPORTING_ORDER.exists() else None,
    }
