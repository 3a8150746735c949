"""CPU placement of a latency path: cores of its own (``resources.cpus`` of a stage) and fast
wake-ups from idle (``resources.wakeup_latency_us``).

On a busy node the latency of a chain of processes is set by how long each waits for a core
when its message arrives, not by its computation. A stage that names ``cpus`` runs every thread
of its process (the data loop, ZeroMQ's I/O thread, Ray's threads) on those CPUs; every other
stage of the graph is kept off all the CPUs any stage names, and so is a local Ray that
``streamcal run`` starts (its processes inherit the affinity of the driver that starts them).
The ids are the kernel's (``/sys/devices/system/cpu/online``), the same on every node.
Linux only: elsewhere a graph that pins is refused when its stages start.

An idle CPU halts; waking it for the next message takes tens of microseconds on bare metal and,
on a virtual machine, a round trip through the hypervisor that can take milliseconds. A stage
with ``wakeup_latency_us`` holds a PM QoS request on ``/dev/cpu_dma_latency`` while its process
lives (the kernel drops it when the process ends, however it ends): the node's idle CPUs then
use only idle states that wake within that time (0: they poll). It applies to the whole node and
costs the power (or, on a VM, the host CPU time) of idle polling.
"""

from __future__ import annotations

import logging
import os
import struct
from contextlib import contextmanager
from typing import Iterable, Iterator

from streamcal.errors import StreamcalError

__all__ = ["supported", "online_cpus", "pin_process", "process_cpus", "place_stage", "keep_off",
           "hold_wakeup_latency", "wakeup_latency_us"]

PM_QOS_DEVICE = "/dev/cpu_dma_latency"

log = logging.getLogger("streamcal.cpus")


def supported() -> bool:
    return hasattr(os, "sched_setaffinity") and os.path.isdir("/proc/self/task")


def online_cpus() -> frozenset[int]:
    """The CPU ids the kernel has online (e.g. ``0-1`` -> {0, 1})."""
    try:
        with open("/sys/devices/system/cpu/online") as f:
            text = f.read().strip()
    except OSError:
        return frozenset(range(os.cpu_count() or 1))
    ids: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        ids.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(ids)


def pin_process(cpus: Iterable[int]) -> None:
    """Every thread of this process on ``cpus``; threads started later inherit it from theirs."""
    cpus = set(cpus)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


def process_cpus() -> list[int] | None:
    """The CPUs any thread of this process may run on (None where that cannot be known)."""
    if not supported():
        return None
    seen: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            seen |= os.sched_getaffinity(int(tid))
        except ProcessLookupError:
            pass
    return sorted(seen)


def place_stage(where: str, cpus: tuple[int, ...] | None, reserved: frozenset[int]) -> frozenset[int] | None:
    """Put this process (one stage replica) where the graph wants it: every thread on ``cpus``
    when the stage names them, else off the ``reserved`` CPUs that other stages named. Returns the
    CPUs it now runs on (None: left alone, nothing is pinned in the graph). Threads the process
    starts later inherit it from the thread that starts them."""
    if not reserved:
        return None
    if not supported():
        if cpus:
            raise StreamcalError(f"{where}: resources.cpus needs Linux (os.sched_setaffinity); "
                                 "remove it to run on this platform")
        return None
    if cpus:
        online = online_cpus()
        missing = sorted(set(cpus) - online)
        if missing:
            raise StreamcalError(f"{where}: resources.cpus {list(cpus)}: CPU id(s) {missing} are not online on "
                                 f"node {os.uname().nodename} (online: {sorted(online)})")
        want = frozenset(cpus)
    else:
        want = frozenset(os.sched_getaffinity(0)) - reserved
        if not want:
            log.warning("%s: every CPU it may use is reserved by resources.cpus of other stages; left where it is",
                        where)
            return None
    pin_process(want)
    return want


@contextmanager
def keep_off(cpus: Iterable[int]) -> Iterator[None]:
    """This process, and the processes it starts meanwhile (a local Ray: GCS, raylet, workers),
    off ``cpus``; the process's affinity is restored afterwards (what it started keeps its own)."""
    cpus = frozenset(cpus)
    if not cpus or not supported():
        yield
        return
    before = frozenset(os.sched_getaffinity(0))
    rest = before - cpus
    if not rest:
        log.warning("keeping off CPUs %s would leave this process no CPU; not pinned", sorted(cpus))
        yield
        return
    pin_process(rest)
    try:
        yield
    finally:
        pin_process(before)


def hold_wakeup_latency(where: str, us: int | None) -> int | None:
    """Ask that the node's CPUs wake from idle within ``us`` microseconds for as long as this
    process keeps the returned file descriptor open (None: nothing asked)."""
    if us is None:
        return None
    try:
        fd = os.open(PM_QOS_DEVICE, os.O_WRONLY)
    except OSError as exc:
        raise StreamcalError(f"{where}: resources.wakeup_latency_us: cannot open {PM_QOS_DEVICE} ({exc.strerror}): "
                             "it needs Linux and root or write access to that file; remove the field to run "
                             "without it") from None
    os.write(fd, struct.pack("i", us))
    return fd


def wakeup_latency_us() -> int | None:
    """The node's current PM QoS wake-up latency limit in microseconds (the smallest request
    held; 2000000000 when none), or None where it cannot be read."""
    try:
        with open(PM_QOS_DEVICE, "rb") as f:
            raw = f.read(4)
    except OSError:
        return None
    return struct.unpack("i", raw)[0] if len(raw) == 4 else None
