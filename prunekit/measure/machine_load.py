"""How busy the machine was while a latency was measured, and when a figure is not to be trusted.

The rule (every threshold is an argument of :func:`judge`, defaults below):

* **other processes' CPU use** during the timing: busy CPU time of the whole machine from
  ``/proc/stat`` (user + nice + system + irq + softirq + steal) minus this process's own CPU
  time (``os.times``), divided by the wall time: how many cores *other* processes kept busy.
  Unreliable when that exceeds ``busy_cores`` (default ``0.25 x`` the machine's cores: half a
  core of a 2-core machine). Other processes take cores, caches and memory bandwidth from the
  timed model even when there are more cores than threads.
* **load average**: the 1-minute load before the timing (it lags, so it catches load that was
  there before the timing started) above ``load_per_core`` (default 1.0) x cores plus the
  threads this measurement itself will run.
* **spread** ``p90 / p10`` of one batch size's runs above ``max_spread`` (default 1.5; quiet
  runs of this project's models measure 1.02-1.2).

Where ``/proc/stat`` does not exist (macOS, Windows) only the load average and the spread are
judged, and ``other_cpu_cores`` is None.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field

__all__ = ["DEFAULT_BUSY_FRACTION", "DEFAULT_LOAD_PER_CORE", "DEFAULT_MAX_SPREAD", "LoadMonitor",
           "MachineLoad", "cpu_model_name", "judge", "load_average"]

DEFAULT_MAX_SPREAD = 1.5
DEFAULT_BUSY_FRACTION = 0.25
DEFAULT_LOAD_PER_CORE = 1.0


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _machine_busy_seconds() -> float | None:
    """Busy CPU seconds of all cores since boot (None without /proc/stat)."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 4:
        return None
    # user nice system idle iowait irq softirq steal (guest is already inside user)
    busy = sum(fields[:3]) + sum(fields[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class MachineLoad:
    """The machine during one measurement."""

    cores: int
    load_average_1min: float | None
    other_cpu_cores: float | None  # cores other processes kept busy during the timing
    wall_seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadMonitor:
    """``with LoadMonitor() as monitor: ...`` then ``monitor.result``."""

    result: MachineLoad | None = None
    _start: tuple = field(default=(), repr=False)

    def __enter__(self) -> "LoadMonitor":
        self._start = (load_average(), time.perf_counter(), _machine_busy_seconds(),
                       _own_cpu_seconds())
        return self

    def __exit__(self, *exc) -> None:
        load, wall0, busy0, own0 = self._start
        wall, busy, own = time.perf_counter() - wall0, _machine_busy_seconds(), _own_cpu_seconds()
        others = None
        if busy is not None and busy0 is not None and wall > 0:
            # clock ticks are coarse (10 ms): never report a negative share
            others = round(max(0.0, (busy - busy0) - (own - own0)) / wall, 3)
        self.result = MachineLoad(cores=_cores(), load_average_1min=load,
                                  other_cpu_cores=others, wall_seconds=round(wall, 3))


def judge(load: MachineLoad | None, spreads: dict, threads: int, *,
          max_spread: float = DEFAULT_MAX_SPREAD, busy_fraction: float = DEFAULT_BUSY_FRACTION,
          load_per_core: float = DEFAULT_LOAD_PER_CORE) -> list[str]:
    """The reasons a measurement is unreliable (empty: none found). ``spreads``: batch size
    (or a label) -> p90/p10."""
    reasons = []
    for batch, spread in spreads.items():
        if spread is not None and spread > max_spread:
            label = batch if isinstance(batch, str) else f"batch {batch}"
            reasons.append(f"{label}: p90/p10 spread {spread:.2f} > {max_spread:g} "
                           "(run-to-run variation too large)")
    if load is not None:
        busy_limit = busy_fraction * load.cores
        if load.other_cpu_cores is not None and load.other_cpu_cores > busy_limit:
            reasons.append(f"other processes kept {load.other_cpu_cores:.2f} of {load.cores} "
                           f"cores busy during the timing (> {busy_limit:.2f})")
        load_limit = load_per_core * load.cores + threads
        if load.load_average_1min is not None and load.load_average_1min > load_limit:
            reasons.append(f"1-minute load average {load.load_average_1min:.2f} > "
                           f"{load_limit:.2f} ({load.cores} cores + {threads} timing threads)")
    return reasons
