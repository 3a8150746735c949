"""``streamcal bench transport``: the data plane against raw ZeroMQ and against Ray calls.

The same Arrow record batches (one non-nullable ``binary`` column, one row, sized so that the
Arrow IPC payload is about 64 B, 100 kB and 10 MB) travel between two Ray actors, i.e. two
processes, over TCP loopback, three ways:

* ``raw``: pyzmq PUSH/PULL, a msgpack header with the same keys as ours plus an Arrow IPC
  stream payload; encoded on send (header and payload per message), decoded on receive.
* ``streamcal``: exactly what a stage pays. The sender is a :class:`~streamcal.stage.Source`
  whose :meth:`~streamcal.stage.Stage.emit` (schema check, header, lineage) goes through an
  :class:`~streamcal.transport.OutputEdge` (payload encoding, ``lseq``, ``ROUTER_MANDATORY``
  routing); the receiver is a :class:`~streamcal.stage.Sink` fed by an
  :class:`~streamcal.transport.InputEdge` through :meth:`~streamcal.stage.Stage.receive`
  (:func:`streamcal.wire.decode` with schema, fingerprint and batch checks, sequence and
  lineage accounting, metrics), polled the way the runtime's loop polls.
* ``ray``: Ray actor method calls carrying the record batch, pipelined (a window of calls in
  flight, kept full with ``ray.wait``).

Rates are measured from the sender's first send to the receiver's last decode (both read the
same system-wide monotonic clock) after a warm-up on the same sockets; the number of messages of
each timed round is chosen from the warm-up rate so that a round takes about ``--seconds``. The
timed rounds of the three paths are interleaved (a, b, c, a, b, c, ...), so that a change in the
machine's load affects all three alike; the best round of each path is reported (the median
too) and the ratios are taken between best rounds. GB/s counts IPC payload bytes (1 GB = 1e9
bytes) for all three.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

import msgpack
import pyarrow as pa
import zmq

from streamcal import wire
from streamcal.config import Config
from streamcal.schemas import register_schema
from streamcal.stage import InputWiring, Sink, Source, StageContext
from streamcal.transport import InputEdge, OutputEdge, ReaderGroup, StopRequested, recv_frames

__all__ = [
    "SIZES",
    "BLOB",
    "TARGETS",
    "make_batch",
    "run_transport_bench",
    "add_subparser",
    "main",
]

#: nominal payload sizes (label -> bytes of the Arrow IPC payload)
SIZES: dict[str, int] = {"64B": 64, "100kB": 100_000, "10MB": 10_000_000}

#: targets of the framework issue: b/c at 64 B and at 10 MB, b/a at every size
TARGETS = {"ratio_vs_ray": {"64B": 20.0, "10MB": 3.0}, "ratio_vs_raw": 0.9}

BLOB = register_schema(
    "bench.blob",
    pa.schema([pa.field("blob", pa.binary(), nullable=False)]),
    doc="Transport benchmark: one opaque blob per message.",
)

_STREAM = "bench"
_PRODUCER = "tx/0"
_READER = "rx"
_PORT = "in"
_IDENTITY = f"{_READER}/0/{_PORT}".encode()
_COPY_THRESHOLD = 65536  # the same zero-copy threshold as streamcal.transport
_STALL_S = 60.0  # a path that moves nothing for this long is broken: fail instead of hanging


def make_batch(nominal: int) -> pa.RecordBatch:
    """A one-row ``bench.blob`` batch whose IPC payload is ``nominal`` bytes where it can be.

    Below the fixed overhead of an IPC stream (schema message, batch message, end-of-stream
    marker: a few hundred bytes) the blob holds ``nominal`` bytes and the payload is bigger."""

    def build(n: int) -> pa.RecordBatch:
        blob = pa.array([bytes(range(256)) * (n // 256) + bytes(n % 256)], type=pa.binary())
        return pa.RecordBatch.from_arrays([blob], schema=BLOB.schema)

    overhead = wire.encode_payload(build(0)).size
    n = nominal - overhead if nominal > 2 * overhead else nominal
    batch = build(n)
    # padding to 8 bytes may leave the payload a few bytes off; close the difference once
    diff = nominal - wire.encode_payload(batch).size
    if nominal > 2 * overhead and diff:
        batch = build(n + diff)
    return batch


def _now() -> int:
    return time.monotonic_ns()  # CLOCK_MONOTONIC: comparable between the two processes


# ---------------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class _NoConfig(Config):
    pass


class _BenchSource(Source):
    kind = "bench_source"
    Config = _NoConfig

    @classmethod
    def outputs(cls, config: Any) -> dict[str, str]:
        return {"out": BLOB.name}

    def generate(self) -> Iterator[None]:  # not used: the sender calls emit() directly
        return iter(())


class _BenchSink(Sink):
    kind = "bench_sink"
    Config = _NoConfig

    @classmethod
    def inputs(cls, config: Any) -> dict[str, str]:
        return {_PORT: BLOB.name}

    def process(self, port: str, batch: pa.RecordBatch, header: wire.Header) -> None:
        self.rows = getattr(self, "rows", 0) + batch.num_rows


# ---------------------------------------------------------------------------------- actors
def _node_token(method: str) -> str | None:
    """The shared-memory token of a streamcal method: the Ray node id, as the runtime uses it."""
    if method != "streamcal":
        return None
    import ray

    return ray.get_runtime_context().get_node_id()


class _Socket:
    """What both ends of a pair hold: a raw socket, streamcal edges (one per streamcal method)."""

    sock: Any = None
    sc: dict[str, tuple[Any, Any]]

    def close(self, method: str) -> None:
        if method == "raw" and self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
        if method in self.sc:
            self.sc.pop(method)[1].close()


class _Sender(_Socket):
    """The writing end of all three paths (a plain class; wrapped as a Ray actor below)."""

    def __init__(self) -> None:
        self.zctx = zmq.Context()
        self.batch: pa.RecordBatch | None = None
        self.sock: zmq.Socket | None = None
        self.sc: dict[str, tuple[_BenchSource, OutputEdge]] = {}
        self.seq = 0
        self.deadline = float("inf")

    def set_batch(self, nominal: int) -> int:
        self.batch = make_batch(nominal)
        return wire.encode_payload(self.batch).size

    # (a) raw PUSH/PULL
    def raw_open(self, hwm: int) -> str:
        self.sock = self.zctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.SNDTIMEO, int(_STALL_S * 1000))  # zmq.Again instead of a hang
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        return f"tcp://127.0.0.1:{port}"

    def raw_send(self, n: int) -> int:
        sock, batch = self.sock, self.batch
        t0 = _now()
        for _ in range(n):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, batch.schema) as writer:
                writer.write_batch(batch)
            payload = sink.getvalue()
            header = msgpack.packb(
                {"v": 1, "stream": _STREAM, "seq": self.seq, "producer": _PRODUCER, "kind": "data",
                 "t0_ns": self.seq, "t1_ns": self.seq + 1, "sent_ns": time.time_ns(),
                 "schema": BLOB.name, "fp": BLOB.fingerprint},
                use_bin_type=True,
            )
            try:
                sock.send_multipart([header, payload], copy=payload.size < _COPY_THRESHOLD)
            except zmq.Again:
                raise RuntimeError(f"raw path: the receiver took no message for {_STALL_S:.0f} s") from None
            self.seq += 1
        return t0

    # (b) the streamcal data plane
    def sc_open(self, method: str, hwm: int) -> str:
        ctx = StageContext(stage="tx", kind=_BenchSource.kind, outputs={"out": _STREAM})
        stage = _BenchSource(_NoConfig(), ctx)
        edge = OutputEdge(self.zctx, _STREAM, [ReaderGroup(_READER, (_IDENTITY,))], hwm=hwm,
                          counters=stage.metrics.outputs["out"], label="bench", stall_timeout_s=_STALL_S / 2,
                          should_abort=lambda: time.monotonic() > self.deadline, shm_token=_node_token(method))
        ctx.send = lambda port, header, batch: edge.send(header, batch)
        self.sc[method] = (stage, edge)
        return edge.endpoint

    def sc_send(self, method: str, n: int) -> int:
        stage, batch = self.sc[method][0], self.batch
        self.deadline = time.monotonic() + _STALL_S + n * 1e-3
        t0 = _now()
        try:
            for _ in range(n):
                k = self.seq
                stage.emit("out", batch, k, k + 1)
                self.seq += 1
        except StopRequested:
            raise RuntimeError(f"streamcal path: the receiver took no message for {_STALL_S:.0f} s") from None
        return t0

    def sc_eos(self, method: str) -> dict[str, int]:
        self.deadline = time.monotonic() + 10.0
        stage, edge = self.sc[method]
        try:
            stage._complete()
        except StopRequested:
            raise RuntimeError("streamcal path: the receiver did not take the end-of-stream") from None
        return edge.pool.stats() if edge.pool is not None else {}

    # (c) Ray actor calls
    def ray_send(self, receiver: Any, n: int, window: int) -> tuple[int, int]:
        """Pipelined calls; (first send, last result) times: the receiver's work is in the results."""
        import ray

        batch = self.batch
        t0 = _now()
        refs: list = []
        rows = 0
        for _ in range(n):
            if len(refs) >= window:
                done, refs = ray.wait(refs, num_returns=1)
                rows += ray.get(done[0])
            refs.append(receiver.take.remote(batch))
        rows += sum(ray.get(refs))
        t1 = _now()
        if rows != n * batch.num_rows:
            raise RuntimeError(f"ray path: {rows} rows arrived, {n * batch.num_rows} sent")
        return t0, t1


class _Receiver(_Socket):
    """The reading end of all three paths (a plain class; wrapped as a Ray actor below)."""

    def __init__(self) -> None:
        self.zctx = zmq.Context()
        self.sock: zmq.Socket | None = None
        self.sc: dict[str, tuple[_BenchSink, InputEdge]] = {}
        self.got = 0

    # (a)
    def raw_open(self, endpoint: str, hwm: int) -> None:
        self.sock = self.zctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, int(_STALL_S * 1000))  # zmq.Again instead of a hang
        self.sock.connect(endpoint)

    def raw_recv(self, n: int, rows_per_message: int = 1) -> dict[str, int]:
        sock = self.sock
        rows = 0
        for i in range(n):
            try:
                h, p = sock.recv_multipart(copy=False)
            except zmq.Again:
                raise RuntimeError(f"raw path: nothing received for {_STALL_S:.0f} s ({n - i} of {n} missing)") from None
            header = msgpack.unpackb(h.bytes, raw=False)
            reader = pa.ipc.open_stream(p.buffer)
            if not reader.schema.equals(BLOB.schema) or header["fp"] != BLOB.fingerprint:
                raise RuntimeError("raw path: unexpected schema")
            rows += reader.read_next_batch().num_rows
        t_end = _now()
        if rows != n * rows_per_message:
            raise RuntimeError(f"raw path: {rows} rows arrived, {n * rows_per_message} sent")
        return {"t_end": t_end, "messages": n, "rows": rows}

    # (b)
    def sc_open(self, method: str, endpoint: str, hwm: int) -> None:
        ctx = StageContext(stage=_READER, kind=_BenchSink.kind, inputs={_PORT: InputWiring(_STREAM, (_PRODUCER,))})
        self.sc[method] = (_BenchSink(_NoConfig(), ctx),
                           InputEdge(self.zctx, _PORT, _IDENTITY, [endpoint], hwm=hwm, shm_token=_node_token(method)))

    def sc_recv(self, method: str, n: int) -> dict[str, int]:
        """The runtime's receive loop (poll, drain up to 256 messages, send releases) until ``n``
        data messages."""
        stage, edge = self.sc[method]
        sock = edge.socks[0]
        shm = edge.resolver(sock)
        c = stage.metrics.inputs[_PORT]
        target = c.messages + n
        last = time.monotonic()
        while c.messages < target:
            if not sock.poll(100):
                if time.monotonic() - last > _STALL_S:
                    raise RuntimeError(f"streamcal path: nothing received for {_STALL_S:.0f} s "
                                       f"({target - c.messages} of {n} messages missing)")
                continue
            last = time.monotonic()
            for _ in range(256):
                try:
                    frames = recv_frames(sock, zmq.NOBLOCK)
                except zmq.Again:
                    break
                stage.receive(_PORT, frames, shm=shm)
                del frames
                if edge.readers:
                    edge.flush()
        return {"t_end": _now(), "messages": c.messages, "rejected": sum(c.rejects.values()), "gaps": c.gaps}

    def sc_drain_eos(self, method: str, timeout_s: float = 10.0) -> dict[str, Any]:
        stage, edge = self.sc[method]
        sock = edge.socks[0]
        deadline = time.monotonic() + timeout_s
        while not stage.done and time.monotonic() < deadline:
            if sock.poll(100):
                stage.receive(_PORT, recv_frames(sock), shm=edge.resolver(sock))
        return stage.report()

    # (c)
    def take(self, batch: pa.RecordBatch) -> int:
        self.got += 1
        return batch.num_rows



# ---------------------------------------------------------------------------------- driver
METHODS = ("raw", "streamcal", "streamcal_tcp", "ray")
_LABELS = {"raw": "(a) raw PUSH/PULL", "streamcal": "(b) streamcal", "streamcal_tcp": "(b') streamcal, TCP only",
           "ray": "(c) Ray calls"}
_STREAMCAL = ("streamcal", "streamcal_tcp")


def _window(payload: int) -> int:
    """Queue bound (ZeroMQ high-water mark) and Ray calls in flight: 64, fewer for big messages."""
    return max(4, min(64, (256 * 1024 * 1024) // max(payload, 1)))


class _Pair:
    """The two actors, driven from the driver: open, timed rounds, close, per method."""

    def __init__(self, sender: Any, receiver: Any) -> None:
        import ray

        self.ray = ray
        self.tx, self.rx = sender, receiver

    def open(self, method: str, hwm: int) -> None:
        get = self.ray.get
        if method == "raw":
            ep = get(self.tx.raw_open.remote(hwm))
            get(self.rx.raw_open.remote(ep, hwm))
        elif method in _STREAMCAL:
            ep = get(self.tx.sc_open.remote(method, hwm))
            get(self.rx.sc_open.remote(method, ep, hwm))

    def round(self, method: str, n: int, window: int) -> float:
        """Send ``n`` messages; seconds from the first send to the last decode."""
        get = self.ray.get
        if method == "raw":
            r = self.rx.raw_recv.remote(n)
            t0 = get(self.tx.raw_send.remote(n))
            t1 = get(r)["t_end"]
        elif method in _STREAMCAL:
            r = self.rx.sc_recv.remote(method, n)
            t0 = get(self.tx.sc_send.remote(method, n))
            out = get(r)
            if out["rejected"] or out["gaps"]:
                raise RuntimeError(f"streamcal path rejected {out['rejected']} / lost {out['gaps']} message(s)")
            t1 = out["t_end"]
        else:
            t0, t1 = get(self.tx.ray_send.remote(self.rx, n, window))
        return max(t1 - t0, 1) / 1e9

    def close(self, method: str) -> dict[str, int]:
        stats: dict[str, int] = {}
        if method in _STREAMCAL:
            stats = self.ray.get(self.tx.sc_eos.remote(method))
            rep = self.ray.get(self.rx.sc_drain_eos.remote(method))
            inputs = rep["metrics"]["inputs"][_PORT]
            if inputs["gaps"] or sum(inputs["rejects"].values()):
                raise RuntimeError(f"streamcal path: {inputs['gaps']} gap(s), rejects {inputs['rejects']}")
        self.ray.get([self.tx.close.remote(method), self.rx.close.remote(method)])
        return stats


def _warm_up(pair: _Pair, method: str, window: int, *, warmup_s: float, seconds: float, max_messages: int) -> int:
    """Rounds of growing size until one lasts ``warmup_s`` (connections, caches, Ray worker
    leases); returns the message count of a timed round of about ``seconds``."""
    n = 20
    while True:
        dt = pair.round(method, n, window)
        if dt >= warmup_s or n >= max_messages:
            break
        n = min(max_messages, max(2 * n, int(n * warmup_s / max(dt, 1e-6) * 1.2)))
    return int(min(max_messages, max(window * 4, 20, n / dt * seconds)))


def _measure_size(pair: _Pair, label: str, payload: int, methods: tuple[str, ...], *, seconds: float,
                  repeat: int, warmup_s: float, max_messages: int, progress: "_Progress") -> dict[str, Any]:
    """Every method at one payload size, timed rounds interleaved across the methods."""
    window = _window(payload)
    opened: list[str] = []
    counts: dict[str, int] = {}
    runs: dict[str, list[float]] = {m: [] for m in methods}
    stats: dict[str, dict[str, int]] = {}
    try:
        for m in methods:
            pair.open(m, window)
            opened.append(m)
        for m in methods:
            progress.start(f"{label:>6} {_LABELS[m]:<18} warm-up")
            counts[m] = _warm_up(pair, m, window, warmup_s=warmup_s, seconds=seconds, max_messages=max_messages)
            progress.done(f"{label:>6} {_LABELS[m]:<18} warm-up: {counts[m]:,} messages per round")
        for r in range(repeat):
            for m in methods:
                progress.start(f"{label:>6} {_LABELS[m]:<18} round {r + 1}/{repeat}")
                dt = pair.round(m, counts[m], window)
                runs[m].append(counts[m] / dt)
                progress.done(f"{label:>6} {_LABELS[m]:<18} round {r + 1}/{repeat}: {counts[m] / dt:>10,.0f} msgs/s "
                              f"{counts[m] / dt * payload / 1e9:7.3f} GB/s ({counts[m]:,} in {dt:.2f} s)")
    finally:
        for m in opened:
            stats[m] = pair.close(m)
    row: dict[str, Any] = {}
    for m in methods:
        best = max(runs[m])
        row[m] = {
            "msgs_per_s": round(best, 1),
            "gb_per_s": round(best * payload / 1e9, 4),
            "median_msgs_per_s": round(float(statistics.median(runs[m])), 1),
            "messages": counts[m],
            "rounds_msgs_per_s": [round(x, 1) for x in runs[m]],
            "window": window,
        }
        if stats.get(m):  # messages whose payload went through shared memory, and inline fallbacks
            row[m].update(stats[m])
    return row


def _machine() -> dict[str, Any]:
    import ray

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "pyarrow": pa.__version__,
        "ray": ray.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
    }


def run_transport_bench(
    *,
    sizes: dict[str, int] | None = None,
    methods: tuple[str, ...] = METHODS,
    seconds: float = 1.5,
    repeat: int = 3,
    warmup_s: float = 0.3,
    max_messages: int = 1_000_000,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able result (see module docstring).

    Uses the running Ray session if there is one, else starts (and stops) a local one."""
    import ray

    sizes = dict(SIZES if sizes is None else sizes)
    unknown = [s for s in sizes if s not in SIZES] + [m for m in methods if m not in METHODS]
    if unknown or not sizes or not methods or repeat < 1 or seconds <= 0:
        raise ValueError(f"run_transport_bench: bad sizes/methods/repeat/seconds {unknown or ''} "
                         f"(sizes: {', '.join(SIZES)}; methods: {', '.join(METHODS)}; repeat >= 1; seconds > 0)")
    own_ray = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        own_ray = True
    result: dict[str, Any] = {
        "benchmark": "transport",
        "transport": "tcp://127.0.0.1 (loopback), sender and receiver in two Ray actors (two processes) on one "
                     "node; (b) as a graph runs it: payloads from 256 kB on through shared memory (/dev/shm), "
                     "(b') with shared memory off",
        "methods": {m: _LABELS[m] for m in methods},
        "machine": _machine(),
        "settings": {"seconds": seconds, "repeat": repeat, "warmup_s": warmup_s, "max_messages": max_messages,
                     "statistic": "best of the interleaved rounds; ratios between best rounds"},
        "targets": TARGETS,
        "sizes": {},
    }
    bar = _Progress(progress, len(sizes) * len(methods) * (1 + repeat))
    sender = receiver = None
    try:
        sender = ray.remote(num_cpus=0)(_Sender).remote()
        receiver = ray.remote(num_cpus=0)(_Receiver).remote()
        pair = _Pair(sender, receiver)
        for label, nominal in sizes.items():
            payload = ray.get(sender.set_batch.remote(nominal))
            row: dict[str, Any] = {"nominal_bytes": nominal, "payload_bytes": payload}
            row.update(_measure_size(pair, label, payload, tuple(methods), seconds=seconds, repeat=repeat,
                                     warmup_s=warmup_s, max_messages=max_messages, progress=bar))
            if "streamcal" in row and "ray" in row:
                row["ratio_vs_ray"] = round(row["streamcal"]["msgs_per_s"] / row["ray"]["msgs_per_s"], 2)
            if "streamcal" in row and "raw" in row:
                row["ratio_vs_raw"] = round(row["streamcal"]["msgs_per_s"] / row["raw"]["msgs_per_s"], 3)
            if "streamcal_tcp" in row and "ray" in row:
                row["ratio_tcp_vs_ray"] = round(row["streamcal_tcp"]["msgs_per_s"] / row["ray"]["msgs_per_s"], 2)
            result["sizes"][label] = row
    finally:
        bar.close()
        for a in (sender, receiver):
            if a is not None:
                ray.kill(a)
        if own_ray:
            ray.shutdown()
    result["targets_met"] = _targets_met(result["sizes"])
    return result


def _targets_met(rows: dict[str, dict]) -> dict[str, bool]:
    met = {}
    for label, want in TARGETS["ratio_vs_ray"].items():
        if label in rows and "ratio_vs_ray" in rows[label]:
            met[f"ratio_vs_ray@{label}>={want:g}"] = rows[label]["ratio_vs_ray"] >= want
    for label, row in rows.items():
        if "ratio_vs_raw" in row:
            met[f"ratio_vs_raw@{label}>={TARGETS['ratio_vs_raw']:g}"] = row["ratio_vs_raw"] >= TARGETS["ratio_vs_raw"]
    return met


class _Progress:
    """Progress on stderr: one line per finished step, and a live bar when stderr is a terminal."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total
        self.step = 0
        self.t0 = time.monotonic()
        self.p = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self.p.start()
            self.task = self.p.add_task("starting", total=total)

    def start(self, text: str) -> None:
        if self.p is not None:
            self.p.update(self.task, description=text)

    def done(self, text: str) -> None:
        self.step += 1
        if not self.enabled:
            return
        line = f"[{self.step:>{len(str(self.total))}}/{self.total} {time.monotonic() - self.t0:6.1f} s] {text}"
        if self.p is not None:
            self.p.console.print(line, highlight=False)
            self.p.advance(self.task)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()
            self.p = None


def format_table(result: dict[str, Any]) -> str:
    """The figures as a text table."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    t = Table(title="transport benchmark (TCP loopback, two processes; best of interleaved rounds)")
    for col in ("size", "payload B", "method", "msgs/s", "median", "GB/s", "b/c", "b/a"):
        t.add_column(col, justify="left" if col in ("size", "method") else "right")
    for label, row in result["sizes"].items():
        first = True
        for m in METHODS:
            if m not in row:
                continue
            r = row[m]
            t.add_row(
                label if first else "", f"{row['payload_bytes']:,}" if first else "", _LABELS[m],
                f"{r['msgs_per_s']:,.0f}", f"{r['median_msgs_per_s']:,.0f}", f"{r['gb_per_s']:.3f}",
                f"{row['ratio_vs_ray']:.1f}" if first and "ratio_vs_ray" in row else "",
                f"{row['ratio_vs_raw']:.2f}" if first and "ratio_vs_raw" in row else "",
            )
            first = False
    buf = StringIO()
    Console(file=buf, width=120, force_terminal=False).print(t)
    met = result.get("targets_met", {})
    if met:
        buf.write("targets: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in met.items()) + "\n")
    return buf.getvalue()


# ---------------------------------------------------------------------------------- CLI
def _add_transport_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON to FILE ('-': to stdout)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 0.2 s rounds, one repeat, 64B and 100kB unless --sizes says otherwise")
    p.add_argument("--seconds", type=float, default=1.5, help="target duration of a timed round (default 1.5)")
    p.add_argument("--repeat", type=int, default=3,
                   help="interleaved timed rounds per method and size; the best is kept (default 3)")
    p.add_argument("--sizes", help=f"comma-separated subset of {','.join(SIZES)} (default: all)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.set_defaults(func=transport_command)


def transport_command(args: argparse.Namespace) -> int:
    """``streamcal bench transport``: run, print the table, write ``--json``. Returns the exit code."""
    labels = [s.strip() for s in (args.sizes or ",".join(SIZES)).split(",") if s.strip()]
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [s for s in labels if s not in SIZES] + [m for m in methods if m not in METHODS]
    if bad or not labels or not methods:
        print(f"error: unknown or no size/method {bad} (sizes: {', '.join(SIZES)}; methods: {', '.join(METHODS)})",
              file=sys.stderr)
        return 2
    if args.repeat < 1 or args.seconds <= 0:
        print("error: --repeat must be >= 1 and --seconds > 0", file=sys.stderr)
        return 2
    kw: dict[str, Any] = {"seconds": args.seconds, "repeat": args.repeat}
    if args.quick:
        kw = {"seconds": 0.2, "repeat": 1, "warmup_s": 0.05, "max_messages": 20_000}
        if args.sizes is None:  # keep the biggest message out of a smoke run
            labels = ["64B", "100kB"]
    result = run_transport_bench(sizes={s: SIZES[s] for s in labels}, methods=methods,
                                 progress=not args.no_progress, **kw)
    to_stdout = args.json == "-"
    print(format_table(result), end="", file=sys.stderr if to_stdout else sys.stdout)
    if to_stdout:
        print(json.dumps(result, indent=2))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` (with subcommand ``transport``) to a CLI's subparsers."""
    p = subparsers.add_parser("bench", help="benchmarks", description="Benchmarks of the framework.")
    sub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    t = sub.add_parser(
        "transport",
        help="data plane vs raw ZeroMQ vs Ray calls at 64 B, 100 kB, 10 MB",
        description="The same Arrow batches through (a) raw pyzmq PUSH/PULL, (b) the streamcal data plane "
        "between two Ray actors, (c) pipelined Ray actor calls; messages/s, GB/s and the ratios b/c, b/a.",
    )
    _add_transport_args(t)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scripts/bench_transport.py`` (the ``transport`` subcommand's options)."""
    p = argparse.ArgumentParser(prog="bench_transport", description="streamcal transport benchmark")
    _add_transport_args(p)
    args = p.parse_args(argv)
    return args.func(args)
