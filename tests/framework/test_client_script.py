"""The standalone subscriber ``scripts/subscribe_client.py``: no streamcal import, and it reads
what our encoder (``streamcal.wire``) publishes on a real ZeroMQ PUB socket over TCP loopback."""

from __future__ import annotations

import ast
import importlib.util
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pytest
import zmq

from streamcal import wire
from streamcal.schemas import REGISTRY, fingerprint, tensor_column
from streamcal.stage import stage_kinds
from streamcal.wire import Header

from streamcal.actors.running_stats import SCORED
from streamcal.actors.synthetic import SAMPLES

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "subscribe_client.py"


def _load_client() -> ModuleType:
    spec = importlib.util.spec_from_file_location("subscribe_client", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    return mod


# ----------------------------------------------------------------------------- helpers
def _header(schema, producer: str, seq: int, kind: str = "data", stream: str = "scored", **extra: Any) -> Header:
    t0 = seq * 10_000_000
    return Header(stream=stream, seq=seq, producer=producer, kind=kind, t0_ns=t0, t1_ns=t0 + 10_000_000,
                  schema=schema.name, fp=schema.fingerprint, extra=dict(extra))


def _scored(event: list[int], value: list[float], score: list[float]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array(event, pa.int64()), pa.array([e % 8 for e in event], pa.int32()),
         pa.array(value, pa.float64()), pa.array(score, pa.float64())],
        schema=SCORED.schema,
    )


class _Publishers:
    """PUB sockets bound on loopback at random ports, as a published stream's writer replicas bind them."""

    def __init__(self, n: int = 1) -> None:
        self.zctx = zmq.Context()
        self.socks = []
        self.endpoints = []
        for _ in range(n):
            s = self.zctx.socket(zmq.PUB)
            s.setsockopt(zmq.LINGER, 1000)
            port = s.bind_to_random_port("tcp://127.0.0.1")
            self.socks.append(s)
            self.endpoints.append(f"tcp://127.0.0.1:{port}")

    def send(self, frames: list, i: int = 0) -> None:
        self.socks[i].send_multipart(frames)

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.zctx.term()


class _Client:
    """The script as a subprocess, its stdout read line by line in a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def until(self, predicate: Callable[[str], bool], poke: Callable[[], None], timeout: float = 10.0) -> None:
        """Call ``poke`` every 20 ms until a line satisfies ``predicate`` (a PUB delivers nothing
        before the subscription has arrived, so the test publishes watermarks until one shows)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            poke()
            try:
                line = self.lines.get(timeout=0.02)
            except queue.Empty:
                continue
            self.seen.append(line)
            if predicate(line):
                return
        self.proc.kill()
        raise AssertionError(f"client never printed the expected line; stderr:\n{self.proc.stderr.read()}")

    def finish(self, timeout: float = 10.0) -> tuple[int, list[str], str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        stderr = self.proc.stderr.read()
        time.sleep(0.05)  # let the reader thread hand over the last lines
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc, self.seen, stderr


def _watermark(producer: str = "score/0", stream: str = "scored") -> list:
    return wire.encode(_header(SCORED, producer, 0, kind="watermark", stream=stream), None)


# ----------------------------------------------------------------------------- tests
def test_script_does_not_import_streamcal():
    tree = ast.parse(SCRIPT.read_text(), filename=str(SCRIPT))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in a standalone script"
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
            "__import__", "import_module"
        ):
            raise AssertionError("dynamic import in the client script")
    assert "streamcal" not in imported
    third_party = imported - set(sys.stdlib_module_names)
    assert third_party <= {"zmq", "pyarrow", "msgpack", "numpy"}, third_party


def test_client_fingerprint_matches_streamcal():
    client = _load_client()
    stage_kinds()
    for info in REGISTRY:
        assert client.fingerprint(info.name, info.schema) == info.fingerprint, info.name
    every_type = pa.schema([
        pa.field("map", pa.fixed_shape_tensor(pa.float32(), [2, 3]), nullable=False),
        pa.field("t", pa.timestamp("us", tz="UTC")),
        pa.field("p", pa.struct([pa.field("x", pa.float32(), nullable=False), pa.field("y", pa.uint16())])),
        pa.field("l", pa.list_(pa.int8())),
        pa.field("ll", pa.large_list(pa.string())),
        pa.field("f", pa.list_(pa.float16(), 4)),
        pa.field("b", pa.bool_(), nullable=False),
        pa.field("raw", pa.large_binary()),
    ])
    assert client.fingerprint("test.every", every_type) == fingerprint("test.every", every_type)
    # the worked example of docs/wire-format.md
    assert SCORED.fingerprint == "64fe38d427356b89"


def test_client_decodes_published_stream_until_eos():
    pubs = _Publishers()
    client = _Client("--endpoint", pubs.endpoints[0], "--stream", "scored", "--json", "--timeout", "8")
    try:
        client.until(lambda line: '"watermark"' in line, lambda: pubs.send(_watermark()))
        batches = {
            0: _scored([0, 1, 2], [10.0, 11.5, 12.25], [0.0, 0.5, -1.0]),
            1: _scored([3, 4], [13.0, 14.0], [1.5, 2.5]),
            3: _scored([7], [17.5], [-0.25]),  # seq 2 is never sent: a latest-only drop
        }
        pubs.send(wire.encode(_header(SCORED, "score/0", 0, src={"source/0": [[0, 0]]}), batches[0]))
        pubs.send([b"\x00not msgpack", b""])  # garbage header
        pubs.send([wire.encode_header(_header(SCORED, "score/0", 1)), b"", b""])  # 3 frames
        bad = _header(SCORED, "score/0", 1)
        bad.v = 2
        pubs.send(wire.encode(bad, batches[1]))  # unknown format version
        wrong_fp = _header(SCORED, "score/0", 1)
        wrong_fp.fp = "0123456789abcdef"
        pubs.send(wire.encode(wrong_fp, batches[1]))  # fingerprint does not match the payload
        pubs.send(wire.encode(_header(SAMPLES, "source/0", 0, stream="samples"),
                              pa.RecordBatch.from_arrays([pa.array([1]), pa.array([1], pa.int32()), pa.array([1.0])],
                                                         schema=SAMPLES.schema)))  # another stream
        pubs.send(wire.encode(_header(SCORED, "score/0", 1), batches[1]))
        pubs.send(wire.encode(_header(SCORED, "score/0", 3), batches[3]))
        pubs.send(wire.encode(_header(SCORED, "score/0", 4, kind="eos", origins={"source/0": 4}), None))
        rc, lines, stderr = client.finish()
    finally:
        pubs.close()
    assert rc == 0, stderr
    records = [json.loads(line) for line in lines]
    data = [r for r in records if r.get("kind") == "data"]
    assert [r["seq"] for r in data] == [0, 1, 3]
    assert [r["missed"] for r in data] == [0, 0, 1]
    assert [r["rows"] for r in data] == [3, 2, 1]
    for r in data:
        b = batches[r["seq"]]
        assert r["schema"] == "demo.scored" and r["producer"] == "score/0"
        assert r["t0_ns"] == r["seq"] * 10_000_000 and r["t1_ns"] == r["t0_ns"] + 10_000_000
        for col in ("event", "channel", "value", "score"):
            assert r["columns"][col]["sum"] == pytest.approx(float(np.sum(b.column(col).to_numpy())))
    eos = [r for r in records if r.get("kind") == "eos"]
    assert eos == [{"kind": "eos", "stream": "scored", "producer": "score/0", "seq": 4,
                    "t0_ns": 40_000_000, "t1_ns": 50_000_000, "sent": 4, "missed": 0}]
    summary = records[-1]
    assert summary["summary"] is True
    assert summary["data"] == 3 and summary["rows"] == 6 and summary["missed"] == 1
    assert summary["eos"] == {"score/0": 4}
    assert summary["rejected"] == {"header": 1, "frames": 1, "version": 1, "schema_fingerprint": 1}
    assert summary["other_streams"] == 1
    assert "rejected: [version]" in stderr


def test_client_eos_from_every_replica_and_tail_loss():
    pubs = _Publishers(2)  # two writer replicas, each with its own PUB endpoint
    client = _Client("--endpoint", pubs.endpoints[0], "--endpoint", pubs.endpoints[1], "--timeout", "8")
    try:
        client.until(lambda line: line.startswith("watermark scored score/0"), lambda: pubs.send(_watermark(), 0))
        client.until(lambda line: line.startswith("watermark scored score/1"),
                     lambda: pubs.send(_watermark("score/1"), 1))
        pubs.send(wire.encode(_header(SCORED, "score/0", 0), _scored([0], [1.0], [0.0])), 0)
        # an end-of-stream must have an empty payload: rejected, the stream goes on
        pubs.send([wire.encode_header(_header(SCORED, "score/0", 3, kind="eos")), b"junk"], 0)
        pubs.send(wire.encode(_header(SCORED, "score/0", 3, kind="eos"), None), 0)  # sent 3: 1 and 2 lost
        pubs.send(wire.encode(_header(SCORED, "score/1", 0, kind="eos"), None), 1)  # sent nothing
        rc, lines, stderr = client.finish()
    finally:
        pubs.close()
    assert rc == 0, stderr
    assert any(line.startswith("data scored score/0 seq=0 ") and "value:sum=1 " in line for line in lines), lines
    assert "eos scored score/0 sent=3 (missed 2)" in lines
    assert "eos scored score/1 sent=0" in lines
    summary = lines[-1]
    assert summary.startswith("summary: 1 data messages, 1 rows, 2 missed, end-of-stream from 2/2 producers (complete)")
    assert "1 rejected {'payload': 1}" in summary
    assert "[payload]" in stderr


def test_client_count_and_tensor_columns():
    schema = pa.schema([pa.field("t0_ns", pa.int64(), nullable=False),
                        pa.field("map", pa.fixed_shape_tensor(pa.float32(), [2, 3]), nullable=False)])
    fp = fingerprint("test.map", schema)
    maps = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)  # two rows of 2x3 maps
    batch = pa.RecordBatch.from_arrays([pa.array([5, 6], pa.int64()), tensor_column(maps)], schema=schema)
    pubs = _Publishers()
    client = _Client("--endpoint", pubs.endpoints[0], "--count", "2", "--timeout", "8")
    try:
        client.until(lambda line: line.startswith("watermark"), lambda: pubs.send(_watermark(stream="maps")))
        for seq in range(3):
            h = Header(stream="maps", seq=seq, producer="calib/0", t0_ns=seq, t1_ns=seq + 1, schema="test.map", fp=fp)
            pubs.send(wire.encode(h, batch))
        rc, lines, stderr = client.finish()
    finally:
        pubs.close()
    assert rc == 0, stderr
    data = [line for line in lines if line.startswith("data ")]
    assert len(data) == 2  # stopped at --count without waiting for an end-of-stream
    assert all("rows=2" in line and f"map:sum={maps.sum():g},shape=(2,2,3)" in line and "t0_ns:sum=11" in line
               for line in data), data
    assert lines[-1].startswith("summary: 2 data messages, 4 rows, 0 missed, end-of-stream from 0/1 producers (incomplete)")
