"""What every benchmark shares: side-by-side rounds in alternating order, the load average printed with the figures,
the peak RSS as the kernel counts it, and the figures as one JSON object on the last line of stdout.

Side-by-side rounds: each round runs every variant once, the order rotated by one every round (A B, B A, A B, …
for two; A B C, B C A, C A B, … for three), so that load from other processes hits all of them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from typing import Any, Dict, List, Optional, Sequence, TypeVar

T = TypeVar("T")


def rotated(items: Sequence[T], r: int) -> List[T]:
    """Round ``r``'s order of ``items``: rotated left by ``r`` (A B C, B C A, C A B, …; A B, B A for two)."""
    k = r % len(items)
    return list(items[k:]) + list(items[:k])


def rounds(items: Sequence[T], n: int):
    """The ``n`` side-by-side rounds as (round number, its order `rotated`)."""
    for r in range(n):
        yield r, rotated(items, r)


def loadavg() -> str:
    """/proc/loadavg as the kernel writes it (1, 5, 15 minutes, runnable/total, last pid), "n/a" without it."""
    try:
        with open("/proc/loadavg") as fh:
            return fh.read().strip()
    except OSError:
        return "n/a"


def rss_bytes() -> int:
    """This process's current resident set (pages in /proc/self/statm)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def vmhwm_bytes() -> Optional[int]:
    """This process's VmHWM (peak RSS since exec or the last reset), None where /proc has none."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> str:
    """Reset this process's RSS high-water mark to its current RSS; returns what `peak_rss_bytes` reads from now.

    "vmhwm_since_reset" when the kernel took the reset (``5`` written to /proc/self/clear_refs); otherwise the
    process's lifetime peak: "vmhwm_lifetime" (VmHWM, since exec) or, without VmHWM, "ru_maxrss_lifetime".
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return "vmhwm_since_reset"
    except OSError:
        return "vmhwm_lifetime" if vmhwm_bytes() is not None else "ru_maxrss_lifetime"


def peak_rss_bytes() -> int:
    """This process's peak RSS as the kernel counts it (every page ever resident, not samples of the RSS): VmHWM,
    else ru_maxrss."""
    hwm = vmhwm_bytes()
    if hwm is not None:
        return hwm
    # KiB; Linux carries ru_maxrss across exec, so it may include the RSS of the process that started this one
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def figures_line(fig: Dict[str, Any], **kwargs: Any) -> str:
    """The figures as the one-line JSON object a benchmark ends with (``kwargs`` go to `json.dumps`)."""
    return json.dumps(fig, **kwargs)


def print_figures(fig: Dict[str, Any], **kwargs: Any) -> None:
    """Print the figures as the last line of stdout (flushed: a caller reads the last line as the result)."""
    print(figures_line(fig, **kwargs), flush=True)


def load_now() -> float:
    """The 1-minute load average (printed next to figures taken on a shared machine)."""
    return os.getloadavg()[0]


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose bad input is one line, ``NAME: error: MESSAGE``, and exit 2 (argparse would print
    the usage too): the jobs' one-line-error contract."""

    def __init__(self, name: str, **kwargs):
        super().__init__(**kwargs)
        self.name = name

    def error(self, message):
        print(f"{self.name}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
