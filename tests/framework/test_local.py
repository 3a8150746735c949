"""In-process runs: the demo graph's exact output, timers, lineage, rejects, record/replay."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from streamcal import wire
from streamcal.graph import load_graph, parse_graph
from streamcal.record import read_recording, replay_frames
from streamcal.testing import run_graph_local, run_stage

from streamcal.actors.fuzz import MALFORMED
from streamcal.actors.synthetic import SyntheticConfig, synthetic_batch

ROOT = Path(__file__).resolve().parents[2]


def expected_demo_scores(messages=500, rows=64, channels=8, seed=7, replicas=2) -> np.ndarray:
    """Scores by the textbook formula (x_i - mean(x_<i)) / std(x_<i, ddof=1), per replica and channel,
    with message k routed to replica k % replicas."""
    rng = np.random.default_rng([seed, 0])
    cfg = SyntheticConfig(messages=messages, rows=rows, channels=channels, seed=seed)
    batches = [synthetic_batch(cfg, k, rng) for k in range(messages)]
    scores = []
    for r in range(replicas):
        mine = [b for k, b in enumerate(batches) if k % replicas == r]
        ch = np.concatenate([b.column("channel").to_numpy() for b in mine])
        x = np.concatenate([b.column("value").to_numpy() for b in mine])
        s = np.zeros_like(x)
        for c in range(channels):
            xs = x[ch == c]
            out = np.zeros_like(xs)
            for i in range(2, len(xs)):
                out[i] = (xs[i] - xs[:i].mean()) / xs[:i].std(ddof=1)
            s[ch == c] = out
        scores.append(s)
    return np.concatenate(scores)


def test_demo_graph_in_process_exact_output():
    res = run_graph_local(ROOT / "configs" / "demo.yaml")
    sink = res.stage("sink").summary()
    assert sink["messages"] == 500 and sink["rows"] == 500 * 64
    assert sink["t0_ns"] == 0 and sink["t1_ns"] == 500 * 10_000_000
    assert sink["out_of_order"] == 0
    assert sink["sum_score"] == pytest.approx(expected_demo_scores().sum(), rel=1e-10, abs=1e-9)
    # each replica's timers: every 100 ms of event time up to the last event time it saw
    assert [s.timers for s in res.stages["score"]] == [49, 50]
    assert [s.summary()["samples"] for s in res.stages["score"]] == [16000, 16000]
    rows = {r["stage"]: r for r in res.merged["stages"]}
    assert rows["sink"]["lineage"] == {"source/0": {"sent": 500, "reached": 500, "lost": 0}}
    assert res.merged["lost"] == 0
    assert rows["score"]["in_msgs"] == 500 and rows["score"]["out_msgs"] == 500
    table = res.summary_table()
    assert "streamcal run summary" in table and "score" in table


def test_run_stage_helper_for_one_stage():
    cfg = SyntheticConfig(rows=8, channels=2)
    rng = np.random.default_rng(0)
    batches = [(synthetic_batch(cfg, k, rng), k * 10, k * 10 + 10) for k in range(3)]
    stage, out = run_stage("running_stats", {"channels": 2, "summary_ms": 1e-5}, {"in": batches})
    assert [h.seq for h, _ in out["out"]] == [0, 1, 2]
    assert [(h.t0_ns, h.t1_ns) for h, _ in out["out"]] == [(0, 10), (10, 20), (20, 30)]
    assert stage.done and stage.summary()["samples"] == 24
    assert out["out"][0][1].schema.names == ["event", "channel", "value", "score"]


FUZZ = """
settings: {max_message_bytes: 1000000}
stages:
  - name: fuzz
    kind: fuzz
    config: {messages: 120, bad_every: 3, oversize_bytes: 1500000}
    outputs: {out: raw}
  - name: typed
    kind: running_stats
    inputs: {in: raw}
    outputs: {out: scored}
  - name: sink
    kind: collect
    inputs: {in: scored}
  - name: any
    kind: collect
    inputs: {in: raw}
"""


def test_malformed_messages_are_rejected_counted_and_the_stage_keeps_running():
    res = run_graph_local(parse_graph(FUZZ))
    expected = res.stage("fuzz").summary()["expected_rejects"]
    assert sum(expected.values()) == 40 and set(expected) == set(MALFORMED.values())
    for name in ("typed", "any"):
        rejects = dict(res.stage(name).metrics.inputs["in"].rejects)
        assert rejects == expected, name
    assert res.stage("sink").summary()["messages"] == 120  # every valid message got through
    assert res.stage("any").summary()["messages"] == 120
    assert res.merged["lost"] == 0


def test_record_then_replay_is_bit_identical(tmp_path):
    rec = tmp_path / "samples.arrow"
    g1 = parse_graph(textwrap.dedent(f"""
    stages:
      - name: src
        kind: synthetic
        config: {{messages: 30, rows: 16, seed: 3}}
        outputs: {{out: samples}}
      - name: rec
        kind: record
        config: {{path: "{rec}"}}
        inputs: {{in: samples}}
      - name: keep
        kind: collect
        config: {{keep: 100}}
        inputs: {{in: samples}}
    """))
    r1 = run_graph_local(g1)
    original = r1.stage("keep").batches
    recorded = list(read_recording(rec))
    assert len(recorded) == len(original) == 30
    for (h0, b0), (h1, b1) in zip(original, recorded):
        assert wire.encode_payload(b1).to_pybytes() == wire.encode_payload(b0).to_pybytes()
        d0, d1 = h0.to_dict(), h1.to_dict()
        d0.pop("lseq")
        assert d1 == d0
    # replayed frames: same payload bytes, same header but for sent_ns
    for (h0, b0), (h2, frames) in zip(original, replay_frames(rec, speed=0)):
        assert bytes(frames[1]) == wire.encode_payload(b0).to_pybytes()
        d0, d2 = h0.to_dict(), wire.decode_header(frames[0]).to_dict()
        d0.pop("lseq"), d0.pop("sent_ns"), d2.pop("sent_ns")
        assert d2 == d0
    # and as a source in a graph
    g2 = parse_graph(textwrap.dedent(f"""
    stages:
      - name: replay
        kind: replay
        config: {{path: "{rec}", schema: demo.samples, speed: 0}}
        outputs: {{out: samples}}
      - name: keep
        kind: collect
        config: {{keep: 100}}
        inputs: {{in: samples}}
    """))
    replayed = run_graph_local(g2).stage("keep").batches
    assert [(h.seq, h.t0_ns, h.t1_ns) for h, _ in replayed] == [(h.seq, h.t0_ns, h.t1_ns) for h, _ in original]
    assert all(b.equals(b0) for (_, b), (_, b0) in zip(replayed, original))


def test_replay_paces_by_event_time(tmp_path):
    import time

    from streamcal.record import Recorder

    from streamcal.actors.synthetic import SAMPLES

    rec = tmp_path / "r.arrow"
    cfg = SyntheticConfig(rows=2)
    rng = np.random.default_rng(0)
    with Recorder(rec, SAMPLES.schema) as w:
        for k in range(6):
            h = wire.Header(stream="s", seq=k, producer="p/0", t0_ns=k * 50_000_000, t1_ns=(k + 1) * 50_000_000,
                            schema=SAMPLES.name, fp=SAMPLES.fingerprint)
            w.write(h, synthetic_batch(cfg, k, rng))
    t = time.monotonic()
    n = sum(1 for _ in replay_frames(rec, speed=1.0))
    dt = time.monotonic() - t
    assert n == 6 and 0.24 <= dt < 0.6  # 5 gaps of 50 ms of event time
    t = time.monotonic()
    list(replay_frames(rec, speed=5.0))
    assert time.monotonic() - t < 0.15


def test_a_failing_process_is_counted_and_the_stage_goes_on(caplog):
    from streamcal.actors.running_stats import RunningStats

    good = synthetic_batch(SyntheticConfig(rows=4), 0, np.random.default_rng(0))
    wrong = good.drop_columns(["value"])

    class Broken(RunningStats):
        kind = "broken_test_stage"

        def process(self, port, batch, header):
            if header.seq == 0:
                self.emit("out", wrong, 0, 1)  # a stage bug: the batch does not match its schema
            super().process(port, batch, header)

    stage, out = run_stage(Broken, {}, {"in": [(good, 0, 1), (good, 1, 2)]})
    assert stage.errors == 1 and stage.metrics.inputs["in"].rejects["process"] == 1
    assert [h.seq for h, _ in out["out"]] == [0]
    assert "does not match schema 'demo.scored'" in caplog.text
