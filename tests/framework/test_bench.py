"""The transport benchmark: payload sizing, argument checks, and a very short run on local Ray."""

from __future__ import annotations

import argparse
import json

import pytest

from streamcal import bench, wire


@pytest.mark.parametrize("label", ["100kB", "10MB"])
def test_payload_has_the_nominal_size(label):
    nominal = bench.SIZES[label]
    assert wire.encode_payload(bench.make_batch(nominal)).size == nominal


def test_small_payload_carries_the_nominal_blob():
    batch = bench.make_batch(64)
    assert len(batch.column("blob")[0].as_py()) == 64  # the IPC framing around it is a few hundred bytes


def test_bad_arguments_are_refused_before_anything_starts(capsys):
    p = argparse.ArgumentParser()
    bench._add_transport_args(p)
    assert bench.transport_command(p.parse_args(["--sizes", "1GB"])) == 2
    assert "unknown or no size/method ['1GB']" in capsys.readouterr().err
    assert bench.transport_command(p.parse_args(["--methods", "grpc"])) == 2
    assert bench.transport_command(p.parse_args(["--repeat", "0"])) == 2
    with pytest.raises(ValueError, match="bad sizes/methods"):
        bench.run_transport_bench(sizes={"1GB": 10**9})


@pytest.mark.ray
def test_quick_run_reports_every_method_side_by_side(ray_session):
    result = bench.run_transport_bench(sizes={"64B": 64}, seconds=0.05, repeat=2, warmup_s=0.02,
                                       max_messages=2_000, progress=False)
    row = result["sizes"]["64B"]
    assert row["nominal_bytes"] == 64 and row["payload_bytes"] > 64
    for m in bench.METHODS:
        r = row[m]
        assert r["msgs_per_s"] > 0 and r["gb_per_s"] >= 0
        assert len(r["rounds_msgs_per_s"]) == 2 and r["msgs_per_s"] == max(r["rounds_msgs_per_s"])
        assert r["median_msgs_per_s"] <= r["msgs_per_s"]
    assert row["ratio_vs_ray"] == pytest.approx(row["streamcal"]["msgs_per_s"] / row["ray"]["msgs_per_s"], rel=1e-2)
    assert row["ratio_vs_raw"] == pytest.approx(row["streamcal"]["msgs_per_s"] / row["raw"]["msgs_per_s"], rel=1e-2)
    assert set(result["targets_met"]) == {"ratio_vs_ray@64B>=20", "ratio_vs_raw@64B>=0.9"}
    assert json.loads(json.dumps(result)) == result
    table = bench.format_table(result)
    assert "(b) streamcal" in table and "targets:" in table
    assert ray_session.is_initialized()  # the benchmark leaves the session it was given running
