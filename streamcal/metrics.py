"""Per-stage and per-edge metrics, sequence ranges, and the end-of-run summary."""

from __future__ import annotations

import bisect
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

__all__ = ["RangeSet", "LatencyReservoir", "EdgeCounters", "StageMetrics", "merge_reports", "summary_table"]


class RangeSet:
    """A set of non-negative integers stored as sorted, disjoint, inclusive ranges [lo, hi]."""

    __slots__ = ("_lo", "_hi")

    def __init__(self, ranges: Iterable[Iterable[int]] = ()) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []
        for lo, hi in ranges:
            self.add(lo, hi)

    def add(self, lo: int, hi: int | None = None) -> None:
        hi = lo if hi is None else hi
        if hi < lo:
            return
        if not self._lo or lo > self._hi[-1] + 1:  # after every range (the in-order case)
            self._lo.append(lo)
            self._hi.append(hi)
            return
        if lo >= self._lo[-1]:  # overlaps or touches the last range
            self._hi[-1] = max(self._hi[-1], hi)
            return
        i = bisect.bisect_left(self._hi, lo - 1)
        j = bisect.bisect_right(self._lo, hi + 1)
        if i < j:
            lo = min(lo, self._lo[i])
            hi = max(hi, self._hi[j - 1])
        self._lo[i:j] = [lo]
        self._hi[i:j] = [hi]

    def update(self, other: "RangeSet | Iterable[Iterable[int]]") -> None:
        for lo, hi in other.to_list() if isinstance(other, RangeSet) else other:
            self.add(lo, hi)

    def __contains__(self, x: int) -> bool:
        i = bisect.bisect_right(self._lo, x) - 1
        return i >= 0 and self._hi[i] >= x

    def count(self) -> int:
        return sum(h - l + 1 for l, h in zip(self._lo, self._hi))

    def to_list(self) -> list[list[int]]:
        return [[l, h] for l, h in zip(self._lo, self._hi)]

    def __len__(self) -> int:
        return self.count()

    def __bool__(self) -> bool:
        return bool(self._lo)

    def __repr__(self) -> str:
        return f"RangeSet({self.to_list()})"


class LatencyReservoir:
    """Keeps the last ``size`` latency samples (ns) for percentiles."""

    def __init__(self, size: int = 20_000) -> None:
        self._d: deque[int] = deque(maxlen=size)

    def add(self, ns: int) -> None:
        self._d.append(ns)

    def percentiles_ms(self) -> dict[str, float | None]:
        if not self._d:
            return {"p50_ms": None, "p99_ms": None, "max_ms": None}
        a = np.fromiter(self._d, dtype=np.float64) / 1e6
        p50, p99 = np.percentile(a, [50, 99])
        return {"p50_ms": round(float(p50), 4), "p99_ms": round(float(p99), 4), "max_ms": round(float(a.max()), 4)}


@dataclass
class EdgeCounters:
    """Counters of one input or output port."""

    stream: str
    messages: int = 0
    bytes: int = 0
    rejects: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    gaps: int = 0  # messages missing on a link, from link sequence numbers
    duplicates: int = 0
    dropped: int = 0  # latest-only: messages not delivered because a newer one replaced them
    stalled_s: float = 0.0  # time the writer waited for a reader (backpressure)
    shm: int = 0  # output: messages whose payload went through shared memory (same node)
    shm_fallbacks: int = 0  # output: large payloads sent inline because the shared-memory pool was full
    latency: LatencyReservoir = field(default_factory=LatencyReservoir)
    event_latency: LatencyReservoir = field(default_factory=LatencyReservoir)

    def snapshot(self, elapsed_s: float) -> dict[str, Any]:
        el = max(elapsed_s, 1e-9)
        return {
            "stream": self.stream,
            "messages": self.messages,
            "bytes": self.bytes,
            "msgs_per_s": round(self.messages / el, 2),
            "bytes_per_s": round(self.bytes / el, 1),
            "rejects": dict(self.rejects),
            "rejected": sum(self.rejects.values()),
            "gaps": self.gaps,
            "duplicates": self.duplicates,
            "dropped": self.dropped,
            "stalled_s": round(self.stalled_s, 3),
            "shm": self.shm,
            "shm_fallbacks": self.shm_fallbacks,
            "latency": self.latency.percentiles_ms(),
            "event_latency": self.event_latency.percentiles_ms(),
        }


class StageMetrics:
    """All counters of one stage replica. Cheap to update from the stage's loop thread."""

    def __init__(self, stage: str, replica: int, incarnation: int = 0) -> None:
        self.stage = stage
        self.replica = replica
        self.incarnation = incarnation
        self.inputs: dict[str, EdgeCounters] = {}
        self.outputs: dict[str, EdgeCounters] = {}
        self.process_ns = 0
        self.start = time.monotonic()
        self.end: float | None = None
        self._ray_metrics: Any = None

    def input(self, port: str, stream: str = "") -> EdgeCounters:
        c = self.inputs.get(port)
        if c is None:
            c = self.inputs[port] = EdgeCounters(stream)
        return c

    def output(self, port: str, stream: str = "") -> EdgeCounters:
        c = self.outputs.get(port)
        if c is None:
            c = self.outputs[port] = EdgeCounters(stream)
        return c

    def elapsed(self) -> float:
        return (self.end or time.monotonic()) - self.start

    def snapshot(self) -> dict[str, Any]:
        el = self.elapsed()
        return {
            "stage": self.stage,
            "replica": self.replica,
            "incarnation": self.incarnation,
            "elapsed_s": round(el, 3),
            "process_s": round(self.process_ns / 1e9, 4),
            "inputs": {p: c.snapshot(el) for p, c in self.inputs.items()},
            "outputs": {p: c.snapshot(el) for p, c in self.outputs.items()},
        }


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge replica reports into per-stage rows and end-to-end loss from lineage.

    Each report is a stage replica's final ``report()``: ``metrics`` (a snapshot), ``lineage``
    (origin -> reached ranges), ``origins`` (origin -> messages sent) and ``restarts``.
    """
    stages: dict[str, dict[str, Any]] = {}
    reached: dict[str, dict[str, RangeSet]] = defaultdict(lambda: defaultdict(RangeSet))
    origins: dict[str, dict[str, int]] = defaultdict(dict)
    for rep in reports:
        m = rep["metrics"]
        row = stages.setdefault(
            m["stage"],
            {
                "stage": m["stage"],
                "kind": rep.get("kind", ""),
                "replicas": 0,
                "restarts": 0,
                "in_msgs": 0,
                "in_bytes": 0,
                "out_msgs": 0,
                "out_bytes": 0,
                "rejected": 0,
                "rejects": defaultdict(int),
                "gaps": 0,
                "duplicates": 0,
                "dropped": 0,
                "stalled_s": 0.0,
                "shm_msgs": 0,
                "shm_fallbacks": 0,
                "elapsed_s": 0.0,
                "latency_p50_ms": None,
                "latency_p99_ms": None,
                "event_latency_p50_ms": None,
                "event_latency_p99_ms": None,
                "summary": [],
            },
        )
        row["replicas"] += 1
        row["restarts"] += rep.get("restarts", 0)
        row["elapsed_s"] = max(row["elapsed_s"], m["elapsed_s"])
        for c in m["inputs"].values():
            row["in_msgs"] += c["messages"]
            row["in_bytes"] += c["bytes"]
            row["rejected"] += c["rejected"]
            for k, v in c["rejects"].items():
                row["rejects"][k] += v
            row["gaps"] += c["gaps"]
            row["duplicates"] += c["duplicates"]
            row["dropped"] += c["dropped"]
            for key, lat in (("latency", "latency"), ("event_latency", "event_latency")):
                for p in ("p50", "p99"):
                    v = c[lat][f"{p}_ms"]
                    k2 = f"{key}_{p}_ms"
                    if v is not None:
                        row[k2] = v if row[k2] is None else max(row[k2], v)
        for c in m["outputs"].values():
            row["out_msgs"] += c["messages"]
            row["out_bytes"] += c["bytes"]
            row["dropped"] += c["dropped"]
            row["stalled_s"] += c["stalled_s"]
            row["shm_msgs"] += c.get("shm", 0)
            row["shm_fallbacks"] += c.get("shm_fallbacks", 0)
        if rep.get("summary"):
            row["summary"].append(rep["summary"])
        for origin, ranges in rep.get("lineage", {}).items():
            reached[m["stage"]][origin].update(ranges)
        for origin, n in rep.get("origins", {}).items():
            origins[m["stage"]][origin] = max(origins[m["stage"]].get(origin, 0), n)
    for name, row in stages.items():
        el = max(row["elapsed_s"], 1e-9)
        row["msgs_per_s"] = round(max(row["in_msgs"], row["out_msgs"]) / el, 1)
        row["bytes_per_s"] = round(max(row["in_bytes"], row["out_bytes"]) / el, 1)
        row["rejects"] = dict(row["rejects"])
        if name in reached or name in origins:
            per = {}
            for origin in sorted(set(reached[name]) | set(origins[name])):
                sent = origins[name].get(origin)
                got = reached[name][origin].count()
                per[origin] = {"sent": sent, "reached": got, "lost": None if sent is None else sent - got}
            row["lineage"] = per
            row["lost"] = sum(v["lost"] or 0 for v in per.values())
        else:
            row["lost"] = 0
    return {"stages": list(stages.values()), "lost": sum(r["lost"] for r in stages.values())}


def summary_table(merged: dict[str, Any]) -> str:
    """The end-of-run summary as a text table (rendered with rich)."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    t = Table(title="streamcal run summary", show_lines=False)
    for col in ("stage", "repl", "restarts", "in", "out", "msg/s", "MB/s", "lat p50/p99 ms", "rejected", "gaps", "dropped", "lost"):
        t.add_column(col, justify="right" if col != "stage" else "left")
    for r in merged["stages"]:
        lat = (
            "-"
            if r["latency_p50_ms"] is None
            else f"{r['latency_p50_ms']:.2f}/{r['latency_p99_ms']:.2f}"
        )
        t.add_row(
            r["stage"],
            str(r["replicas"]),
            str(r["restarts"]),
            str(r["in_msgs"]),
            str(r["out_msgs"]),
            f"{r['msgs_per_s']:.0f}",
            f"{r['bytes_per_s'] / 1e6:.2f}",
            lat,
            str(r["rejected"]),
            str(r["gaps"]),
            str(r["dropped"]),
            str(r["lost"]),
        )
    buf = StringIO()
    console = Console(file=buf, width=140, force_terminal=False)
    console.print(t)
    if merged.get("edges"):
        e = Table(title="edges (messages in flight, sampled by the driver)")
        for col in ("stream", "reader", "queue max", "queue mean"):
            e.add_column(col, justify="left" if col in ("stream", "reader") else "right")
        for row in merged["edges"]:
            e.add_row(row["stream"] + (" (latest-only)" if row.get("latest_only") else ""), row["reader"],
                      str(row["queue_depth_max"]), f"{row['queue_depth_mean']:.1f}")
        console.print(e)
    return buf.getvalue()
