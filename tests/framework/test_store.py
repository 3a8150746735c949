"""The calibration-object store (real SQLite files): validity lookup, newest-wins, concurrent
writers, the ``calib_store`` stage and the ``streamcal store`` command."""

from __future__ import annotations

import json
import multiprocessing as mp
import textwrap

import pyarrow as pa
import pytest

from streamcal.cli import main
from streamcal.errors import StreamcalError
from streamcal.store import CalibStore
from streamcal.testing import run_graph_local


def batch(v: float) -> pa.RecordBatch:
    return pa.record_batch({"x": pa.array([v, 2 * v], pa.float64())})


def test_get_returns_the_object_valid_at_t(tmp_path):
    with CalibStore(tmp_path / "c.sqlite") as st:
        a = st.put("align", 0, 100, batch(1.0), {"pass": 1})
        b = st.put("align", 100, 200, batch(2.0))
        assert st.get("align", -1) is None
        assert st.get("align", 0).id == a and st.get("align", 99).id == a
        assert st.get("align", 100).id == b  # [t0, t1): 100 belongs to the second
        assert st.get("align", 200) is None
        assert st.get("align", 50).table().column("x").to_pylist() == [1.0, 2.0]
        assert st.get("align", 50).metadata == {"pass": 1}
        # a newer object for an overlapping interval supersedes the older one there only
        c = st.put("align", 50, None, batch(3.0))
        assert st.get("align", 49).id == a and st.get("align", 50).id == c and st.get("align", 10**15).id == c
        assert st.get("other", 50) is None
        assert [o.id for o in st.list("align", at_ns=150)] == [c, b]  # by t0
        assert len(st) == 3 and st.names() == ["align"]


def test_payloads_and_bad_input(tmp_path):
    with CalibStore(tmp_path / "c.sqlite") as st:
        i = st.put("raw", 0, None, b"\x00\x01binary")
        assert st.by_id(i).payload == b"\x00\x01binary" and st.by_id(i).format == "bytes"
        with pytest.raises(StreamcalError, match="t1_ns must be an integer > t0_ns=10"):
            st.put("x", 10, 10, b"")
        with pytest.raises(StreamcalError, match="payload must be an Arrow RecordBatch/Table or bytes, got dict"):
            st.put("x", 0, 1, {"a": 1})
        with pytest.raises(StreamcalError, match="metadata must be JSON-serialisable"):
            st.put("x", 0, 1, b"", {"a": object()})
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StreamcalError, match="is not a calibration store"):
        CalibStore(tmp_path / "junk.sqlite")


def _writer(path: str, k: int, n: int) -> None:
    with CalibStore(path) as st:
        for i in range(n):
            st.put(f"w{k}", i * 10, i * 10 + 10, batch(float(i)))


def test_concurrent_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "c.sqlite")
    CalibStore(path).close()
    procs = [mp.get_context("spawn").Process(target=_writer, args=(path, k, 50)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with CalibStore(path) as st:
        assert len(st) == 150
        assert st.get("w2", 495).table().column("x")[0].as_py() == 49.0


def test_calib_store_stage_and_cli(tmp_path, capsys):
    db = tmp_path / "calib.sqlite"
    run_graph_local(textwrap.dedent(f"""
    stages:
      - name: src
        kind: synthetic
        config: {{messages: 20, rows: 4, period_ms: 10, seed: 1}}
        outputs: {{out: samples}}
      - name: store
        kind: calib_store
        config: {{db: "{db}", name: "demo/samples", every: 2}}
        inputs: {{in: samples}}
    """))
    with CalibStore(db) as st:
        objs = st.list("demo/samples")
        assert len(objs) == 10  # every 2nd of 20
        assert [(o.t0_ns, o.t1_ns) for o in objs[:2]] == [(0, 10_000_000), (20_000_000, 30_000_000)]
        assert objs[0].metadata["stream"] == "samples" and objs[0].metadata["seq"] == 0
    assert main(["store", "ls", "--db", str(db), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 10
    assert main(["store", "get", "demo/samples", "--db", str(db), "--at", "25ms"]) == 0
    out = capsys.readouterr().out
    assert '"t0_ns": 20000000' in out and "event: int64" in out
    assert main(["store", "get", "demo/samples", "--db", str(db), "--at", "15ms"]) == 1
    err = capsys.readouterr().err
    assert "no object 'demo/samples' valid at 0.015000s" in err and "cover [0.000000s, 0.010000s)" in err
    assert main(["store", "ls", "--db", str(tmp_path / "missing.sqlite")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_latest_and_wall_clock_times(tmp_path, capsys):
    """Graphs on the wall clock store objects at event times of today: ``get --latest`` and
    ``--at`` with a UTC date find them, and times are shown with their date."""
    db = tmp_path / "calib.sqlite"
    t0 = 1_796_587_200 * 10**9  # 2026-12-06T20:00:00 UTC
    batch = pa.RecordBatch.from_pydict({"x": [1.0]})
    with CalibStore(db) as st:
        for k in range(3):
            st.put("tpc/c", t0 + k * 10**8, t0 + (k + 1) * 10**8, batch, {"k": k})
        st.put("tpc/c", t0, t0 + 10**8, batch, {"k": "late copy of the first"})  # stored last, starts first
        assert st.latest("tpc/c").metadata == {"k": 2}
        assert st.latest("nothing") is None
    assert main(["store", "get", "tpc/c", "--db", str(db), "--latest"]) == 0
    assert '"k": 2' in capsys.readouterr().out
    assert main(["store", "get", "tpc/c", "--db", str(db), "--at", "2026-12-06T20:00:00.15"]) == 0
    assert '"k": 1' in capsys.readouterr().out
    assert main(["store", "get", "tpc/c", "--db", str(db), "--at", "2026-12-06 20:00:01"]) == 1
    assert "(2026-12-06 20:00:00.000000 UTC)" in capsys.readouterr().err
    assert main(["store", "get", "tpc/c", "--db", str(db), "--latest", "--at", "1s"]) == 1
    assert "one of --at TIME or --latest" in capsys.readouterr().err
    assert main(["store", "get", "nothing", "--db", str(db), "--latest"]) == 1
    assert "no object named 'nothing'; names in the store: tpc/c" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["store", "get", "tpc/c", "--db", str(db), "--at", "2026-13-06T20:40:00"])
    assert "is not an ISO 8601 date and time" in capsys.readouterr().err
