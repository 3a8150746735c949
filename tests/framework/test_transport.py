"""The ZeroMQ data plane (:mod:`streamcal.transport`) in one process: the published (XPUB) copy
of a stream counts its drops and delivers its end-of-stream, latest-only links keep each
reader's lineage to itself, and the stage's watermarks carry the incarnation."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import pyarrow as pa
import pytest
import zmq

from streamcal import wire
from streamcal.config import Config
from streamcal.errors import GraphError, StreamcalError, WireError
from streamcal.graph import parse_graph, publish_endpoint, validate_graph
from streamcal.metrics import EdgeCounters
from streamcal.schemas import register_schema
from streamcal.stage import InputWiring, Sink, Source, Stage, StageContext
from streamcal.transport import HELLO, InputEdge, OutputEdge, ReaderGroup, recv_frames, subscriber
from streamcal.wire import Header

BLOB = register_schema("test.transport.blob", pa.schema([pa.field("blob", pa.binary(), nullable=False)]),
                       doc="test: one opaque blob per message")


def _batch(nbytes: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array([b"x" * nbytes], pa.binary())], schema=BLOB.schema)


def _header(seq: int, kind: str = "data", **extra: Any) -> Header:
    return Header(stream="blob", seq=seq, producer="w/0", kind=kind, t0_ns=seq, t1_ns=seq,
                  schema=BLOB.name, fp=BLOB.fingerprint, extra=dict(extra))


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _ipc(tmp_path, name: str) -> str:
    return f"ipc://{tmp_path / name}"


def _subscribe(zctx, edge: OutputEdge, endpoint: str, *, timeout: float = 10.0) -> zmq.Socket:
    """A SUB socket that has joined: the publisher sends data until one message arrives."""
    sub = subscriber(zctx, endpoint, hwm=4)
    deadline = time.monotonic() + timeout
    seq = 0
    while time.monotonic() < deadline:
        edge.send(_header(seq), _batch(8))
        seq += 1
        if sub.poll(20):
            while sub.poll(50):
                sub.recv_multipart()
            return sub
    raise AssertionError("the subscription never arrived")


def _drain(sub: zmq.Socket, quiet_ms: int = 300) -> list[wire.Header]:
    got = []
    while sub.poll(quiet_ms):
        got.append(wire.decode(sub.recv_multipart())[0])
    return got


# ----------------------------------------------------------------------------- published copy
def test_published_drops_are_counted_and_never_block(zctx, tmp_path):
    ep = _ipc(tmp_path, "pub")
    counters = EdgeCounters("blob")
    edge = OutputEdge(zctx, "blob", [], hwm=4, publish=ep, counters=counters, label="test")
    try:
        sub = _subscribe(zctx, edge, ep)
        counters.dropped = 0
        n = 300
        big = _batch(100_000)  # fills the socket buffers fast: the subscriber does not read
        t0 = time.monotonic()
        for k in range(n):
            edge.send(_header(1000 + k), big)
        assert time.monotonic() - t0 < 10  # never waits for the subscriber
        got = _drain(sub)
        # every message was either handed to the subscriber or counted as dropped
        assert counters.dropped > 0
        assert len(got) + counters.dropped == n
        assert all("lseq" not in h.extra for h in got)
    finally:
        edge.close()


def test_published_eos_waits_for_a_slow_subscriber(zctx, tmp_path):
    ep = _ipc(tmp_path, "pub")
    counters = EdgeCounters("blob")
    edge = OutputEdge(zctx, "blob", [], hwm=4, publish=ep, counters=counters, label="test")
    try:
        sub = _subscribe(zctx, edge, ep)
        big = _batch(100_000)
        for k in range(300):  # the subscriber's queue is full now
            edge.send(_header(1000 + k), big)
        got: list[Header] = []

        def slow_reader() -> None:
            time.sleep(0.5)
            while sub.poll(2000):
                h = wire.decode(sub.recv_multipart())[0]
                got.append(h)
                if h.kind == "eos":
                    return

        t = threading.Thread(target=slow_reader)
        t.start()
        edge.send(_header(1300, kind="eos", origins={"w/0": 1300}), None)
        t.join(timeout=15)
        assert got and got[-1].kind == "eos" and got[-1].seq == 1300
    finally:
        edge.close()


def test_published_eos_gives_up_after_its_timeout(zctx, tmp_path):
    ep = _ipc(tmp_path, "pub")
    counters = EdgeCounters("blob")
    edge = OutputEdge(zctx, "blob", [], hwm=4, publish=ep, counters=counters, label="test",
                      publish_eos_timeout_s=0.3)
    try:
        sub = _subscribe(zctx, edge, ep)  # and never read again
        big = _batch(100_000)
        for k in range(300):
            edge.send(_header(1000 + k), big)
        time.sleep(0.3)  # the I/O threads settle: every queue between the two sockets is full now
        dropped = counters.dropped
        for k in range(300, 1000):  # (a drop right before proves it)
            edge.send(_header(1000 + k), big)
            if counters.dropped > dropped:
                break
        dropped = counters.dropped
        t0 = time.monotonic()
        edge.send(_header(1300, kind="eos"), None)
        assert time.monotonic() - t0 < 3.0
        assert dropped > 0 and counters.dropped == dropped + 1
        sub.close(0)
    finally:
        edge.close()


# ----------------------------------------------------------------------------- latest-only lineage
class _Reader:
    """A connected DEALER for one routing id, as an InputEdge makes it."""

    def __init__(self, zctx, edge: OutputEdge, ident: bytes) -> None:
        self.edge = InputEdge(zctx, "in", ident, [edge.endpoint], hwm=64)
        deadline = time.monotonic() + 10
        while ident not in edge.ready:
            assert time.monotonic() < deadline, "the reader's hello never arrived"
            edge.poll_control()
            time.sleep(0.01)

    def recv(self) -> Header:
        sock = self.edge.socks[0]
        assert sock.poll(5000)
        return wire.decode(recv_frames(sock))[0]


def test_latest_only_carry_stays_on_its_link_and_no_nil_src(zctx, tmp_path):
    ep = _ipc(tmp_path, "pub")
    late, steady = b"late/0/in", b"steady/0/in"
    edge = OutputEdge(
        zctx, "blob",
        [ReaderGroup("late", (late,), latest_only=True), ReaderGroup("steady", (steady,))],
        hwm=64, publish=ep, label="test",
    )
    try:
        b = _Reader(zctx, edge, steady)
        sub = _subscribe(zctx, edge, ep)  # (these data messages are dropped on the late link)
        while b.edge.socks[0].poll(100):
            recv_frames(b.edge.socks[0])
        edge._carry.clear()
        dropped = edge.counters.dropped
        # 1: dropped on the late link (its reader is not connected yet), with lineage
        edge.send(_header(1, src={"s/0": [[1, 1]]}), _batch(8))
        # 2: no lineage, dropped too: no "src": nil anywhere, and the carry survives
        h2 = _header(2)
        edge.send(h2, _batch(8))
        assert "src" not in h2.extra
        assert edge.counters.dropped == dropped + 2
        a = _Reader(zctx, edge, late)
        # 3: reaches the late reader with the carried lineage of 1; the others get only their own
        h3 = _header(3, src={"s/0": [[3, 3]]})
        edge.send(h3, _batch(8))
        assert h3.extra["src"] == {"s/0": [[3, 3]]}
        got_b = [b.recv() for _ in range(3)]
        assert [h.seq for h in got_b] == [1, 2, 3]
        assert got_b[0].extra["src"] == {"s/0": [[1, 1]]}
        assert "src" not in got_b[1].extra
        assert got_b[2].extra["src"] == {"s/0": [[3, 3]]}
        got_a = a.recv()
        assert got_a.seq == 3 and got_a.extra["src"] == {"s/0": [[1, 1], [3, 3]]}
        pub = _drain(sub)
        assert [h.seq for h in pub] == [1, 2, 3]
        assert "src" not in pub[1].extra and pub[2].extra["src"] == {"s/0": [[3, 3]]}
        assert not edge._carry
    finally:
        edge.close()


def test_nil_src_is_not_written_after_a_latest_only_drop(zctx):
    """The raw header bytes: a message without lineage has no "src" key on the next link."""
    steady = b"steady/0/in"
    edge = OutputEdge(
        zctx, "blob",
        [ReaderGroup("late", (b"late/0/in",), latest_only=True), ReaderGroup("steady", (steady,))],
        hwm=64, label="test",
    )
    try:
        b = _Reader(zctx, edge, steady)
        edge.send(_header(0), _batch(8))
        sock = b.edge.socks[0]
        assert sock.poll(5000)
        raw = msgpack.unpackb(recv_frames(sock)[0], raw=False)
        assert "src" not in raw
    finally:
        edge.close()


# ----------------------------------------------------------------------------- watermark incarnation
@dataclass(frozen=True)
class _NoConfig(Config):
    pass


class _Src(Source):
    kind = "test_transport_src"
    Config = _NoConfig

    @classmethod
    def outputs(cls, config):
        return {"out": BLOB.name}


class _Snk(Sink):
    kind = "test_transport_sink"
    Config = _NoConfig
    period_calls = 0

    @classmethod
    def inputs(cls, config):
        return {"in": BLOB.name}

    def process(self, port, batch, header):
        pass

    def timer_period_ns(self):
        self.period_calls += 1
        return 10

    def on_timer(self, t_ns):
        self.timers = getattr(self, "timers", 0) + 1


def _link(writer: Stage, reader: Stage, start_lseq: int = 0) -> list:
    """Wire writer -> reader in memory with a link sequence, like one ROUTER/DEALER link."""
    state = {"lseq": start_lseq}
    sent = []

    def send(port, header, batch):
        header.extra["lseq"] = state["lseq"]
        state["lseq"] += 1
        frames = wire.encode(header, batch)
        sent.append(header)
        reader.receive("in", frames)
        return sum(len(f) for f in frames)

    writer.ctx.send = send
    return sent


def test_watermark_carries_the_incarnation_like_data_and_eos():
    w = _Src(_NoConfig(), StageContext(stage="w", kind=_Src.kind, incarnation=2, outputs={"out": "blob"}))
    r = _Snk(_NoConfig(), StageContext(stage="r", kind=_Snk.kind, inputs={"in": InputWiring("blob", ("w/0",))}))
    sent = _link(w, r)
    w.emit("out", _batch(8), 0, 5)
    w.watermark(10)
    w.emit("out", _batch(8), 10, 15)
    w.watermark(20)
    w._complete()
    assert [h.kind for h in sent] == ["data", "watermark", "data", "watermark", "eos"]
    assert all(h.extra.get("inc") == 2 for h in sent)
    c = r.metrics.inputs["in"]
    assert (c.gaps, c.duplicates, c.messages) == (0, 0, 2)
    assert r.done


def test_timer_period_is_read_once():
    w = _Src(_NoConfig(), StageContext(stage="w", kind=_Src.kind, outputs={"out": "blob"}))
    r = _Snk(_NoConfig(), StageContext(stage="r", kind=_Snk.kind, inputs={"in": InputWiring("blob", ("w/0",))}))
    _link(w, r)
    for k in range(50):
        w.emit("out", _batch(8), k * 5, k * 5 + 5)
    w._complete()
    assert r.period_calls == 1
    assert r.timers == 25  # every 10 ns of event time up to 250


def test_single_range_lineage_fast_path_matches_the_general_path():
    r = _Snk(_NoConfig(), StageContext(stage="r", kind=_Snk.kind, inputs={"in": InputWiring("blob", ("w/0",))}))
    for k in [0, 1, 2, 5, 4, 3, 9]:  # in order, out of order, a gap
        r._merge_lineage({"w/0": [[k, k]]})
    r._merge_lineage({"w/0": [[True, 12]]})  # bool is an int for the general path
    r._merge_lineage({"w/0": [[20, 19]], "x": "junk"})
    r._merge_lineage({"w/0": [[30]]})
    assert r.reached["w/0"].to_list() == [[0, 12]]


# ----------------------------------------------------------------------------- header fast path
_GOOD = {"v": 1, "stream": "s", "seq": 3, "producer": "p/0", "kind": "data", "t0_ns": 1, "t1_ns": 2,
         "sent_ns": 5, "schema": BLOB.name, "fp": BLOB.fingerprint}


def _variants():
    yield dict(_GOOD)
    yield dict(_GOOD, lseq=4, src={"a/0": [[1, 2]]}, unknown="kept")
    yield [1, 2]
    for key in _GOOD:
        for bad in (None, True, 1.5, "x", 7, [1], {"a": 1}):
            d = dict(_GOOD)
            d[key] = bad
            yield d
        d = dict(_GOOD)
        del d[key]
        yield d
    yield dict(_GOOD, v=2)
    yield dict(_GOOD, kind="nope")
    yield dict(_GOOD, seq=-1)
    yield dict(_GOOD, kind="eos", seq=0)


@pytest.mark.parametrize("d", list(_variants()))
def test_header_fast_path_agrees_with_the_full_validation(d):
    raw = msgpack.packb(d, use_bin_type=True)

    def outcome(fn):
        try:
            return fn()
        except WireError as exc:
            return ("error", exc.reason, str(exc))

    fast = outcome(lambda: wire.decode_header(raw))
    slow = outcome(lambda: wire._validate(msgpack.unpackb(raw, raw=False)))
    assert fast == slow


def test_encode_payload_ignores_legacy_format_environment(monkeypatch):
    monkeypatch.setenv("ARROW_PRE_0_15_IPC_FORMAT", "1")
    payload = wire.encode_payload(_batch(8))
    assert bytes(payload[:4]) == b"\xff\xff\xff\xff"  # continuation marker: the current format
    assert bytes(payload[-8:]) == b"\xff\xff\xff\xff\x00\x00\x00\x00"


def test_recv_frames_keeps_every_frame(zctx):
    a, b = zctx.socket(zmq.PAIR), zctx.socket(zmq.PAIR)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    try:
        b.send_multipart([b"h", b"p1", b"p2"])
        assert a.poll(5000)
        frames = recv_frames(a)
        assert frames[0] == b"h" and [bytes(f) for f in frames[1:]] == [b"p1", b"p2"]
        b.send(HELLO)
        assert a.poll(5000)
        assert recv_frames(a) == [HELLO]
    finally:
        a.close(0)
        b.close(0)


# ----------------------------------------------------------------------------- publish endpoints
_PUB_GRAPH = """
name: pub
stages:
  - name: src
    kind: synthetic
    config: {{messages: 5}}
    outputs: {{out: samples}}
  - name: score
    kind: running_stats
    replicas: {replicas}
    inputs: {{in: samples}}
    outputs: {{out: scored}}
streams:
  scored: {{publish: "{endpoint}"}}
"""


def test_publish_on_a_non_tcp_endpoint_needs_one_replica():
    validate_graph(parse_graph(_PUB_GRAPH.format(replicas=1, endpoint="ipc://streamcal-scored")))
    with pytest.raises(GraphError) as exc:
        validate_graph(parse_graph(_PUB_GRAPH.format(replicas=2, endpoint="ipc://streamcal-scored")))
    msg = str(exc.value)
    assert "stream 'scored': field 'publish': endpoint ipc://streamcal-scored is not tcp://" in msg
    assert "stage 'score' (line 8) writes the stream with 2 replicas" in msg
    with pytest.raises(StreamcalError, match="only a stage with one replica"):
        publish_endpoint("ipc://streamcal-scored", 1)
    assert publish_endpoint("tcp://127.0.0.1:5601", 1) == "tcp://127.0.0.1:5602"


def test_publish_endpoints_of_replicas_must_not_collide():
    text = _PUB_GRAPH.format(replicas=2, endpoint="tcp://127.0.0.1:5601")
    validate_graph(parse_graph(text + '  samples: {publish: "tcp://127.0.0.1:5603"}\n'))
    with pytest.raises(GraphError) as exc:  # score/1 publishes on 5601 + 1
        validate_graph(parse_graph(text + '  samples: {publish: "tcp://127.0.0.1:5602"}\n'))
    assert ("stream 'samples': field 'publish': endpoint tcp://127.0.0.1:5602 (writer src/0) is also bound "
            "by stream 'scored' (writer score/1)") in str(exc.value)
