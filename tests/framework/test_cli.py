"""The ``streamcal`` command: validate, show, run (on the session's Ray), and tap/record/replay
between real processes over loopback ZeroMQ."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from streamcal import wire
from streamcal.cli import main
from streamcal.record import read_recording
from streamcal.testing import run_graph_local

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The child starts with SIGINT at its default action, whatever the test runner inherited: a job
# started in the background of a non-interactive shell (`cmd &`, nohup) ignores SIGINT, an ignored
# signal stays ignored across exec, and Python then installs no KeyboardInterrupt handler.
_SIGINT_DEFAULT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "os.execv(sys.executable, [sys.executable, '-m', 'streamcal.cli', *sys.argv[1:]])")


def cli(*args: str, timeout: float = 60) -> subprocess.Popen:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    return subprocess.Popen([sys.executable, "-c", _SIGINT_DEFAULT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_validate_and_show(capsys):
    assert main(["validate", str(DEMO)]) == 0
    assert "valid against" in capsys.readouterr().out
    assert main(["show", str(DEMO), "--mermaid"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("flowchart") and "score" in out and "scored" in out


def test_validate_reports_stage_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""
    stages:
      - name: source
        kind: synthetic
        config: {messages: -3}
        outputs: {out: samples}
      - name: sink
        kind: colect
        inputs: {in: samples}
    """))
    assert main(["validate", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "stage 'source' (line 3): field 'config.messages'" in err or "stage 'source'" in err
    assert "messages" in err
    assert "stage 'sink'" in err and "colect" in err


def test_bad_interface_setting_is_named(tmp_path, capsys):
    g = tmp_path / "g.yaml"
    g.write_text(DEMO.read_text().replace("interface: 127.0.0.1", "interface: localhst"))
    assert main(["validate", str(g)]) != 0
    assert "field 'interface': 'localhst' is not an IP address" in capsys.readouterr().err


@pytest.mark.ray
def test_run_prints_summary_and_writes_metrics_json(ray_session, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main(["run", str(DEMO), "--metrics-json", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "streamcal run summary" in text
    m = json.loads(out.read_text())
    rows = {r["stage"]: r for r in m["stages"]}
    assert rows["sink"]["in_msgs"] == 500 and rows["score"]["replicas"] == 2
    assert m["lost"] == 0
    for key in ("msgs_per_s", "bytes_per_s", "latency_p99_ms", "event_latency_p99_ms", "rejected", "dropped"):
        assert key in rows["sink"], sorted(rows["sink"])
    # simulated event time starts at 0: no event-to-receive latency, rather than a nonsense one
    assert rows["sink"]["event_latency_p99_ms"] is None and rows["sink"]["latency_p99_ms"] > 0
    edges = {(e["stream"], e["reader"]): e for e in m["edges"]}
    assert set(edges) == {("samples", "score"), ("scored", "sink")}
    assert all(0 <= e["queue_depth_max"] <= 500 for e in edges.values())
    assert "queue max" in text


def test_replay_record_and_tap_between_processes(tmp_path):
    """A recording replayed by one process, recorded by another and tapped by a third: the second
    recording is bit-identical to the first (headers apart from the send time)."""
    first = tmp_path / "first.arrow"
    g = textwrap.dedent(f"""
    stages:
      - name: src
        kind: synthetic
        config: {{messages: 40, rows: 8, seed: 5}}
        outputs: {{out: samples}}
      - name: rec
        kind: record
        config: {{path: "{first}"}}
        inputs: {{in: samples}}
    """)
    run_graph_local(g)
    port = free_port()
    ep = f"tcp://127.0.0.1:{port}"
    second = tmp_path / "second.arrow"
    rec = cli("record", "samples", "--endpoint", ep, "--out", str(second), "--duration", "60")
    tap = cli("tap", "samples", "--endpoint", ep, "--json", "--timeout", "60")
    rep = cli("replay", str(first), "--publish", ep, "--speed", "0", "--wait", "4")
    try:
        rep_out, rep_err = rep.communicate(timeout=60)
        rec_out, rec_err = rec.communicate(timeout=60)
        tap_out, tap_err = tap.communicate(timeout=60)
    finally:
        for p in (rec, tap, rep):
            p.kill()
    assert rep.returncode == 0, rep_err
    assert "replayed 40 messages" in rep_out
    assert rec.returncode == 0, rec_err
    assert "recorded 40 messages of 'samples'" in rec_out and "0 missed" in rec_out
    a, b = list(read_recording(first)), list(read_recording(second))
    assert len(a) == len(b) == 40
    for (h0, b0), (h1, b1) in zip(a, b):
        assert wire.encode_payload(b0).to_pybytes() == wire.encode_payload(b1).to_pybytes()
        d0, d1 = h0.to_dict(), h1.to_dict()
        d0.pop("sent_ns"), d1.pop("sent_ns")
        assert d0 == d1
    lines = [json.loads(x) for x in tap_out.splitlines() if x.startswith("{")]
    assert [x["seq"] for x in lines] == list(range(40))
    assert all(x["rows"] == 8 and x["stream"] == "samples" for x in lines)
    assert "eos" in tap_out and "tap: 40 messages" in tap_err


def test_tap_needs_a_graph_or_an_endpoint(capsys):
    assert main(["tap", "samples"]) != 0
    assert "--endpoint" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_the_sources_and_drains(tmp_path, sig):
    """SIGINT (Ctrl-C) or SIGTERM (``kill``, a batch system) to ``streamcal run``: the sources end
    their streams early, everything sent is delivered, the summary is printed and the exit code
    is 0."""
    import signal
    import time

    g = tmp_path / "long.yaml"
    g.write_text(textwrap.dedent("""
    stages:
      - name: source
        kind: synthetic
        config: {messages: 100000, rows: 4, period_ms: 10, speed: 1.0, seed: 9}
        outputs: {out: samples}
      - name: sink
        kind: collect
        inputs: {in: samples}
    """))
    metrics = tmp_path / "m.json"
    p = cli("run", str(g), "--no-progress", "--metrics-json", str(metrics))
    try:
        first = p.stdout.readline()  # printed once every replica runs
        assert first.startswith("running long: 2 replicas started"), first + p.stderr.read()[-3000:]
        time.sleep(3)
        p.send_signal(getattr(signal, sig))
        try:
            out, err = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            pytest.fail(f"`streamcal run` did not end within 90 s of {sig}\nstdout tail:\n{out[-3000:]}\n"
                        f"stderr tail:\n{err[-6000:]}")
    finally:
        p.kill()
    assert p.returncode == 0, out[-2000:] + err[-3000:]
    assert "stopping: sources end their streams" in out
    m = json.loads(metrics.read_text())
    rows = {r["stage"]: r for r in m["stages"]}
    sent = rows["source"]["out_msgs"]
    assert 0 < sent < 100000
    assert rows["sink"]["in_msgs"] == sent and m["lost"] == 0
