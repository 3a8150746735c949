#!/usr/bin/env python
"""Subscribe to a published streamcal stream with nothing but pyzmq, pyarrow and msgpack.

This is the template for a reconstruction loop (or any external client): it follows
``docs/wire-format.md`` and imports nothing from streamcal. Replace :func:`handle_batch` with
your own processing.

    # terminal 1: subscribe first (a PUB socket drops what no subscriber receives yet)
    python scripts/subscribe_client.py --endpoint tcp://127.0.0.1:5601 --replicas 2 --stream scored
    # terminal 2: run the demo graph, whose stream 'scored' is published on port 5601
    streamcal run configs/demo.yaml

Each writer replica of a published stream binds its own PUB socket: replica ``r`` on the port of
the ``publish`` endpoint plus ``r``. ``--replicas N`` subscribes to all ``N`` of them.

A published stream is latest-only: a slow subscriber loses messages rather than slowing the
graph. The losses show up as gaps in the per-producer sequence numbers and are counted here.

Exit status: 0 when the stream ended (end-of-stream from every endpoint) or ``--count`` data
messages arrived; 1 when ``--timeout`` passed with no data at all; 2 on a usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import pyarrow as pa
import zmq

FORMAT_VERSION = 1  # the "v" header key this client understands
KINDS = ("data", "eos", "watermark", "control")
REQUIRED = {  # header key -> msgpack type (as decoded by msgpack-python)
    "v": int, "stream": str, "seq": int, "producer": str, "kind": str,
    "t0_ns": int, "t1_ns": int, "sent_ns": int, "schema": str, "fp": str,
}


class Rejected(Exception):
    """A message that does not follow the wire format; ``reason`` is a short code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"[{reason}] {message}")
        self.reason = reason


# --------------------------------------------------------------------------- schema fingerprint
# The fingerprint in the header ("fp") is the first 16 hex digits of SHA-256 over a canonical
# text of the schema: "<schema name>|<field>;<field>;..." with "<name>:<type>" per field and a
# trailing "!" for a non-nullable field (docs/wire-format.md, "Schema fingerprint").
_SIMPLE = {
    pa.int8(): "int8", pa.int16(): "int16", pa.int32(): "int32", pa.int64(): "int64",
    pa.uint8(): "uint8", pa.uint16(): "uint16", pa.uint32(): "uint32", pa.uint64(): "uint64",
    pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64",
    pa.bool_(): "bool", pa.string(): "utf8", pa.large_string(): "large_utf8",
    pa.binary(): "binary", pa.large_binary(): "large_binary", pa.null(): "null",
}


def canonical_type(t: pa.DataType) -> str:
    """Canonical text of one Arrow type."""
    if isinstance(t, pa.FixedShapeTensorType):
        return f"tensor<{canonical_type(t.value_type)}>[{','.join(str(int(d)) for d in t.shape)}]"
    if t in _SIMPLE:
        return _SIMPLE[t]
    if pa.types.is_timestamp(t):
        return f"timestamp[{t.unit}{',' + t.tz if t.tz else ''}]"
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{canonical_type(t.value_type)}>[{t.list_size}]"
    if pa.types.is_large_list(t):
        return f"large_list<{canonical_type(t.value_type)}>"
    if pa.types.is_list(t):
        return f"list<{canonical_type(t.value_type)}>"
    if pa.types.is_struct(t):
        return "struct<" + ",".join(_canonical_field(t.field(i)) for i in range(t.num_fields)) + ">"
    raise ValueError(f"Arrow type {t} has no canonical text")


def _canonical_field(f: pa.Field) -> str:
    return f"{f.name}:{canonical_type(f.type)}{'' if f.nullable else '!'}"


def fingerprint(name: str, schema: pa.Schema) -> str:
    """First 16 hex digits of SHA-256 of the canonical text (UTF-8)."""
    text = name + "|" + ";".join(_canonical_field(f) for f in schema)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- decoding
def decode(frames: list[zmq.Frame]) -> tuple[dict[str, Any], pa.RecordBatch | None]:
    """One message ``[header, payload]`` -> (header map, record batch or None for non-data)."""
    if len(frames) != 2:
        raise Rejected("frames", f"expected 2 frames [header, payload], got {len(frames)}")
    try:
        # strings are msgpack str (UTF-8); extension types are never used by streamcal
        header = msgpack.unpackb(frames[0].bytes, raw=False, ext_hook=_no_ext)
    except Exception as exc:
        raise Rejected("header", f"header is not msgpack ({exc})") from None
    if not isinstance(header, dict):
        raise Rejected("header", f"header is a {type(header).__name__}, not a map")
    if header.get("v") != FORMAT_VERSION:  # check the version before anything else
        raise Rejected("version", f"format version {header.get('v')!r}, this client reads {FORMAT_VERSION}")
    for key, typ in REQUIRED.items():
        if not isinstance(header.get(key), typ) or isinstance(header.get(key), bool):
            raise Rejected("header", f"header key '{key}' is missing or not {typ.__name__}")
    if header["kind"] not in KINDS:
        raise Rejected("kind", f"unknown message kind {header['kind']!r}")
    payload = frames[1].buffer  # zero-copy view of the second frame
    if header["kind"] != "data":
        if len(payload):
            raise Rejected("payload", f"'{header['kind']}' message with a non-empty payload")
        return header, None
    try:
        # the payload is one Arrow IPC stream: schema message, one record batch, end marker
        reader = pa.ipc.open_stream(pa.py_buffer(payload))
        batch = reader.read_next_batch()
    except Exception as exc:
        raise Rejected("payload", f"payload is not an Arrow IPC stream with a record batch ({exc})") from None
    try:
        fp = fingerprint(header["schema"], batch.schema)
    except ValueError as exc:
        raise Rejected("schema_mismatch", str(exc)) from None
    if fp != header["fp"]:
        raise Rejected("schema_fingerprint",
                       f"payload schema gives fingerprint {fp}, header says {header['fp']} ({header['schema']})")
    return header, batch


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} in a header")


# --------------------------------------------------------------------------- your processing
def tpc_correction_map(schema: str, batch: pa.RecordBatch) -> np.ndarray:
    """The TPC correction of a ``tpc.correction/{nphi}x{nr}x{nz}`` or
    ``tpc.correction_rz/{nphi}x{nr}x{nz}`` batch as the map (rows, 3, nphi, nr, nz) in cm.

    ``tpc.correction_rz`` carries a correction that is the same at every phi (the 1D correction)
    as (rows, 3, nr, nz); it is broadcast over the ``nphi`` azimuthal nodes named in the schema
    (a read-only view, no copy: index it, or ``np.array(...)`` it to own the values)."""
    arr = batch.column("correction").to_numpy_ndarray()
    if not schema.startswith("tpc.correction_rz/"):
        return arr
    nphi, nr, nz = (int(d) for d in schema.split("/", 1)[1].split("x"))
    if arr.shape[1:] != (3, nr, nz):
        raise ValueError(f"{schema}: correction of shape {arr.shape[1:]}, expected {(3, nr, nz)}")
    return np.broadcast_to(arr[:, :, None], (arr.shape[0], 3, nphi, nr, nz))


def handle_batch(header: dict[str, Any], batch: pa.RecordBatch) -> dict[str, Any]:
    """Per-message processing; here: a summary per column (numeric sum, tensor shape). A TPC
    correction is summarised as the full (rows, 3, nphi, nr, nz) map, whichever payload carried it."""
    out: dict[str, Any] = {}
    tpc = header["schema"].startswith(("tpc.correction/", "tpc.correction_rz/"))
    for f, col in zip(batch.schema, batch.columns):
        if tpc and f.name == "correction":
            arr = tpc_correction_map(header["schema"], batch)
            out[f.name] = {"shape": list(arr.shape), "sum": float(arr.sum()),
                           "phi_independent": header["schema"].startswith("tpc.correction_rz/")}
        elif isinstance(f.type, pa.FixedShapeTensorType):
            arr = col.to_numpy_ndarray()  # (rows, *shape), row-major
            out[f.name] = {"shape": list(arr.shape), "sum": float(arr.sum())}
        elif pa.types.is_integer(f.type) or pa.types.is_floating(f.type):
            out[f.name] = {"sum": float(np.sum(col.to_numpy(zero_copy_only=False)))}
    return out


# --------------------------------------------------------------------------- the loop
@dataclass
class Tally:
    """What the subscriber saw."""

    data: int = 0
    rows: int = 0
    other_streams: int = 0
    control: Counter = field(default_factory=Counter)  # watermark / control messages
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    last_seq: dict[str, int] = field(default_factory=dict)  # producer -> last data seq
    skipped: int = 0  # data messages missed (sequence gaps; latest-only drops)
    eos: dict[str, int] = field(default_factory=dict)  # producer -> messages it sent

    def gap(self, producer: str, seq: int) -> int:
        """Messages missed before ``seq``; the first message of a producer sets the start."""
        last = self.last_seq.get(producer)
        return 0 if last is None or seq <= last + 1 else seq - last - 1


def endpoints_of(endpoints: list[str], replicas: int) -> list[str]:
    """The endpoints to connect: each one given, or one per writer replica (port + r)."""
    if replicas <= 1:
        return endpoints
    if len(endpoints) != 1 or not endpoints[0].startswith("tcp://"):
        raise ValueError("--replicas needs exactly one tcp:// --endpoint (the graph's publish endpoint)")
    host, _, port = endpoints[0][len("tcp://"):].rpartition(":")
    return [f"tcp://{host}:{int(port) + r}" for r in range(replicas)]


def _dims(shape: list[int]) -> str:
    return "(" + ",".join(str(d) for d in shape) + ")"


def report(args: argparse.Namespace, record: dict[str, Any], text: str) -> None:
    """One output line: ``record`` as JSON with --json, else ``text``."""
    print(json.dumps(record) if args.json else text, flush=True)


def run(args: argparse.Namespace, endpoints: list[str]) -> int:
    zctx = zmq.Context()
    poller = zmq.Poller()
    socks = []
    for ep in endpoints:
        s = zctx.socket(zmq.SUB)
        s.setsockopt(zmq.RCVHWM, args.hwm)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SUBSCRIBE, b"")  # no topic frame: every message; filter on the header
        s.connect(ep)
        poller.register(s, zmq.POLLIN)
        socks.append(s)
    print(f"subscribed to {', '.join(endpoints)}" + (f" (stream '{args.stream}')" if args.stream else ""),
          file=sys.stderr, flush=True)

    tally = Tally()

    def finished() -> bool:  # end of stream from every endpoint, or --count data messages
        return len(tally.eos) >= len(endpoints) or (args.count is not None and tally.data >= args.count)

    t_start = time.monotonic()
    t_last = t_start
    try:
        while not finished():
            if args.timeout and time.monotonic() - t_last > args.timeout:
                print(f"no message for {args.timeout:g} s; stopping", file=sys.stderr, flush=True)
                break
            for sock, _ in poller.poll(100):
                if finished():
                    break
                frames = sock.recv_multipart(copy=False)
                t_last = time.monotonic()
                recv_ns = time.time_ns()
                try:
                    header, batch = decode(frames)
                except Rejected as exc:
                    tally.rejected[exc.reason] += 1
                    print(f"rejected: {exc}", file=sys.stderr, flush=True)
                    continue
                if args.stream and header["stream"] != args.stream:
                    tally.other_streams += 1
                    continue
                producer, seq, kind = header["producer"], header["seq"], header["kind"]
                base = {"kind": kind, "stream": header["stream"], "producer": producer, "seq": seq,
                        "t0_ns": header["t0_ns"], "t1_ns": header["t1_ns"]}
                if kind == "data":
                    missed = tally.gap(producer, seq)
                    tally.skipped += missed
                    tally.last_seq[producer] = seq
                    tally.data += 1
                    tally.rows += batch.num_rows
                    columns = handle_batch(header, batch)
                    latency_ms = (recv_ns - header["sent_ns"]) / 1e6
                    cols = " ".join(
                        f"{k}:sum={v['sum']:.6g}" + (f",shape={_dims(v['shape'])}" if "shape" in v else "")
                        + (",phi-independent" if v.get("phi_independent") else "")
                        for k, v in columns.items()
                    )
                    report(args, {**base, "schema": header["schema"], "rows": batch.num_rows, "missed": missed,
                                "latency_ms": round(latency_ms, 3), "columns": columns},
                         f"data {header['stream']} {producer} seq={seq} t=[{header['t0_ns']},{header['t1_ns']}] ns "
                         f"rows={batch.num_rows} latency={latency_ms:.3f} ms {cols}"
                         + (f" (missed {missed})" if missed else ""))
                elif kind == "eos":
                    # seq of an end-of-stream = data messages the producer sent; the tail it
                    # sent after the last one received here is lost too
                    last = tally.last_seq.get(producer)
                    missed = seq - last - 1 if last is not None and seq > last + 1 else 0
                    tally.skipped += missed
                    tally.eos[producer] = seq
                    report(args, {**base, "sent": seq, "missed": missed},
                         f"eos {header['stream']} {producer} sent={seq}" + (f" (missed {missed})" if missed else ""))
                else:  # watermark / control: no payload; event time in t1_ns
                    tally.control[kind] += 1
                    report(args, base, f"{kind} {header['stream']} {producer} t={header['t1_ns']} ns")
    except KeyboardInterrupt:
        pass
    finally:
        for s in socks:
            s.close(linger=0)
        zctx.term()

    elapsed = time.monotonic() - t_start
    summary = {
        "summary": True, "data": tally.data, "rows": tally.rows, "missed": tally.skipped,
        "eos": tally.eos, "endpoints": len(endpoints), "other_streams": tally.other_streams,
        "control": dict(tally.control), "rejected": dict(tally.rejected), "seconds": round(elapsed, 3),
    }
    ended = "complete" if len(tally.eos) == len(endpoints) else "incomplete"
    report(args, summary,
         f"summary: {tally.data} data messages, {tally.rows} rows, {tally.skipped} missed, "
         f"end-of-stream from {len(tally.eos)}/{len(endpoints)} producers ({ended}), "
         f"{sum(tally.rejected.values())} rejected{' ' + str(dict(tally.rejected)) if tally.rejected else ''}, "
         f"{tally.other_streams} of other streams, {elapsed:.2f} s")
    return 0 if tally.data or tally.eos else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Subscribe to a published streamcal stream (pyzmq + pyarrow + msgpack).")
    p.add_argument("--endpoint", action="append",
                   help="PUB endpoint to connect (repeatable; default tcp://127.0.0.1:5601)")
    p.add_argument("--replicas", type=int, default=1,
                   help="writer replicas of the stream: connect to the endpoint's port + 0..N-1 (default 1)")
    p.add_argument("--stream", "--topic", dest="stream",
                   help="keep only messages whose header 'stream' is this (default: all)")
    p.add_argument("--count", type=int, help="stop after this many data messages")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="stop after this many seconds without a message (default 0: wait forever)")
    p.add_argument("--hwm", type=int, default=1000, help="receive queue bound of each SUB socket (default 1000)")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    args = p.parse_args(argv)
    if args.count is not None and args.count < 1:
        p.error("--count must be >= 1")
    if args.replicas < 1:
        p.error("--replicas must be >= 1")
    try:
        endpoints = endpoints_of(args.endpoint or ["tcp://127.0.0.1:5601"], args.replicas)
    except ValueError as exc:
        p.error(str(exc))
    return run(args, endpoints)


if __name__ == "__main__":
    sys.exit(main())
