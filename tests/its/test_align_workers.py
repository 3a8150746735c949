"""The alignment workers as stages: one worker in-process against the exact least-squares
minimum of the same data, bad hits rejected and counted, two workers on Ray with unequal
partitions, and a killed worker that rejoins the group."""

from __future__ import annotations

import glob
import textwrap
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from streamcal.actors.its_align import ITSAlignConfig, constants_batch
from streamcal.actors.its_tracks import ITSTracksConfig, hits_for_alignment
from streamcal.detectors.its.align import Constraints, pack_tracks, reference_solution, total_cost
from streamcal.detectors.its.simulation import simulate_batch
from streamcal.graph import parse_graph
from streamcal.models.its_alignment import ITSAlignmentConfig, ITSAlignmentModel
from streamcal.store import CalibStore
from streamcal.testing import run_graph_local, run_stage

GEOMETRY = "{layers: 3, chips_u: [1, 1, 1], chips_v: [2, 2, 2]}"  # the ITS2 inner barrel, 96 chips


def graph(run_dir, *, replicas=1, partitions="[1.0]", events=3000, epochs=3, tau=2, restarts=0, stall=60,
          optimizer="{method: gn}", cache_mb=1024.0, spool_layout=True) -> str:
    return textwrap.dedent(f"""
    settings: {{interface: 127.0.0.1, stall_timeout_s: {stall}}}
    stages:
      - name: tracks
        kind: its_tracks
        config:
          geometry: {GEOMETRY}
          misalignment: {{sigma_trans: [0.02, 0.02, 0.02], seed: 5}}
          simulation: {{eta_max: 0.5, pt_min: 0.3, seed: 2}}
          events: {events}
          events_per_message: 250
          partitions: {partitions}
          run_dir: {run_dir}
        outputs: {{out: hits}}
      - name: align
        kind: its_align
        replicas: {replicas}
        restarts: {restarts}
        config:
          geometry: {GEOMETRY}
          tau: {tau}
          epochs: {epochs}
          min_hits: 3
          threads: 1
          optimizer: {optimizer}
          cache_mb: {cache_mb}
          spool_layout: {str(spool_layout).lower()}
          run_dir: {run_dir}
        inputs: {{hits: hits}}
        outputs: {{out: constants}}
      - name: store
        kind: calib_store
        config: {{db: {run_dir}/calib.sqlite, name: its/alignment, validity: open}}
        inputs: {{in: constants}}
    streams:
      hits: {{queue: 4}}
      constants: {{queue: 4, latest_only: true}}
    """)


def spooled(run_dir, geom):
    return [pack_tracks(b, geom, min_hits=3)[0]
            for f in sorted(glob.glob(f"{run_dir}/spool/*.arrows")) for b in pa.ipc.open_stream(pa.memory_map(f))]


def test_one_worker_approaches_the_exact_minimum_and_stores_its_constants(tmp_path):
    res = run_graph_local(graph(tmp_path))
    worker = res.stage("align")
    s = worker.summary()
    costs = s["epoch_cost"]
    assert s["epochs"] == 3 and all(b < a for a, b in zip(costs, costs[1:])), costs
    assert s["rejects"]["hits_unknown_sensor"] == s["rejects"]["hits_nan"] == 0
    # the exact minimum of the same data (sparse Gauss-Newton, the same constraint)
    geom = worker.geom
    model = ITSAlignmentModel.from_geometry(geom, ITSAlignmentConfig())
    batches = spooled(tmp_path, geom)
    c0 = total_cost(model, batches)
    model.set_theta(torch.from_numpy(np.load(tmp_path / "theta.npy")))
    c_run = total_cost(model, batches)
    model.set_theta(torch.zeros(geom.n_sensors, 6, dtype=torch.float64))
    reference_solution(model, batches, Constraints.build(geom, modes=("rz",)), covariance=False)
    c_ref = total_cost(model, batches)
    assert c_ref < c_run < c0
    assert (c0 - c_run) / (c0 - c_ref) > 0.85  # 3 epochs close most of the gap to the minimum
    # the last constants are in the store, valid from the data's start on
    with CalibStore(str(tmp_path / "calib.sqlite")) as store:
        obj = store.get("its/alignment", 10**18)
        assert obj is not None
        table = obj.table()
    stored = np.stack([np.asarray(table.column(c)) for c in ("alpha", "beta", "gamma", "tau1", "tau2", "tau3")], 1)
    np.testing.assert_array_equal(stored, np.load(tmp_path / "theta.npy"))
    assert (tmp_path / "run.json").exists() and (tmp_path / "theta_true.npy").exists()


def test_replayed_epochs_read_the_packed_spool_and_give_the_cached_result(tmp_path):
    """Epochs 2.. replay the packed tracks that epoch 1 spooled (``align.write_tracks``): with no
    cache (every replayed batch read from the spool), with part of the data cached, with all of
    it cached, and with the tracks spooled without the cost's layout, the constants are the same
    to the last bit; the spool's records are the batches ``pack_tracks`` makes of the hits as
    received."""
    from streamcal.detectors.its.align import read_tracks

    thetas, summaries = {}, {}
    for name, mb, layout in (("none", 0.0, True), ("part", 0.4, True), ("all", 1024.0, True),
                             ("tracks only", 0.0, False)):
        res = run_graph_local(graph(tmp_path / name, cache_mb=mb, events=2000, spool_layout=layout))
        summaries[name] = res.stage("align").summary()
        thetas[name] = np.load(tmp_path / name / "theta.npy")
    n_batches = 2000 // 250
    assert summaries["none"]["cache"]["batches"] == 0
    assert summaries["none"]["cache"]["spool_batches"] == 2 * n_batches  # epochs 2 and 3
    assert 0 < summaries["part"]["cache"]["batches"] < n_batches
    assert summaries["all"]["cache"]["spool_batches"] == 0
    np.testing.assert_array_equal(thetas["none"], thetas["all"])
    np.testing.assert_array_equal(thetas["part"], thetas["all"])
    np.testing.assert_array_equal(thetas["tracks only"], thetas["all"])
    size = {name: sum(p.stat().st_size for p in (tmp_path / name / "spool").glob("*.tracks")) for name in thetas}
    assert size["tracks only"] < 0.6 * size["all"]  # the layout is most of the spool
    assert len(summaries["all"]["busy_s"]) == 3 and all(b > 0 for b in summaries["all"]["busy_s"])
    geom = res.stage("align").geom
    raw = spooled(tmp_path / "all", geom)
    with open(tmp_path / "all" / "spool" / "align-0.0.tracks", "rb") as f:
        packed = [tb for tb in iter(lambda: read_tracks(f), None)]
    assert len(packed) == len(raw) == n_batches
    for a, b in zip(packed, raw):
        for field in ("sensor", "local", "mask", "event", "vertex"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_the_seeds_sgd_at_automatic_rates_and_gauss_newton_with_momentum_both_converge(tmp_path):
    costs = {}
    for name, opt in (("sgd", "{method: sgd}"), ("gn", "{method: gn, lr: 1.5, momentum: 0.7}")):
        res = run_graph_local(graph(tmp_path / name, optimizer=opt, epochs=4))
        costs[name] = res.stage("align").summary()["epoch_cost"]
        assert all(b < a for a, b in zip(costs[name], costs[name][1:])), (name, costs[name])
    # the preconditioned option gets further in the same epochs
    assert costs["gn"][-1] < costs["sgd"][-1]


def test_bad_hits_are_rejected_counted_and_never_in_the_cost(tmp_path):
    cfg = ITSTracksConfig.from_dict({"geometry": {"layers": 3, "chips_u": [1, 1, 1], "chips_v": [2, 2, 2]},
                                     "simulation": {"eta_max": 0.5, "seed": 3}})
    geom = cfg.geometry.build()
    clean = hits_for_alignment(simulate_batch(geom, cfg.simulation.config(), 300, batch_index=0))
    n = clean.num_rows
    rng = np.random.default_rng(0)
    extra = {c: np.asarray(clean.column(c)) for c in clean.schema.names}
    pick = rng.choice(n, 12, replace=False)
    bad = {c: v[pick].copy() for c, v in extra.items()}
    bad["sensor"][:4] = [geom.n_sensors, 10**6, -1, geom.n_sensors + 5]  # unknown sensors
    bad["u"][4:8] = np.nan  # NaN coordinates
    bad["v"][8:12] = 40.0  # outside the chip (half-length 15 mm)
    dirty = pa.RecordBatch.from_arrays(
        [pa.array(np.concatenate([extra[c], bad[c]])).cast(f.type) for c, f in zip(clean.schema.names, clean.schema)],
        schema=clean.schema)
    conf = {"geometry": {"layers": 3, "chips_u": [1, 1, 1], "chips_v": [2, 2, 2]}, "tau": 1, "epochs": 1,
            "min_hits": 3, "spool_dir": str(tmp_path / "s")}
    outs = {}
    for name, batch in (("clean", clean), ("dirty", dirty)):
        stage, out = run_stage("its_align", dict(conf, spool_dir=str(tmp_path / name)), {"hits": [(batch, 0, 1)]})
        outs[name] = (stage, out)
    rej = outs["dirty"][0].summary()["rejects"]
    assert (rej["hits_unknown_sensor"], rej["hits_nan"], rej["hits_outside_sensor"]) == (4, 4, 4)
    assert outs["clean"][0].summary()["rejects"]["hits_unknown_sensor"] == 0
    # the extra rows duplicate real hits of real tracks: rejected, they leave the result unchanged
    a = outs["clean"][1]["out"][-1][1]
    b = outs["dirty"][1]["out"][-1][1]
    assert a.equals(b)


def test_config_errors_name_the_field():
    from streamcal.errors import ConfigError

    with pytest.raises(ConfigError, match="tau"):
        ITSAlignConfig.from_dict({"tau": 0})
    with pytest.raises(ConfigError, match="fixed_layers"):
        ITSAlignConfig.from_dict({"geometry": {"layers": 3}, "fixed_layers": [5]})
    with pytest.raises(ConfigError, match="constrain_modes"):
        ITSAlignConfig.from_dict({"constrain_modes": ["wobble"]})
    with pytest.raises(ConfigError, match="partitions"):
        ITSTracksConfig.from_dict({"partitions": [1.0, -1.0]})
    assert constants_batch(np.zeros((3, 6))).num_rows == 3


def test_two_replicas_need_the_ray_runtime(tmp_path):
    from streamcal.errors import StreamcalError

    with pytest.raises(StreamcalError, match="process group"):
        run_graph_local(graph(tmp_path, replicas=2, partitions="[1.0, 1.0]"))


def _rows(res):
    return {r["stage"]: r for r in res.merged["stages"]}


def _worker_summaries(res):
    return sorted((r for r in res.reports if r["metrics"]["stage"] == "align"), key=lambda r: r["metrics"]["replica"])


@pytest.mark.ray
def test_two_workers_on_unequal_partitions_sync_and_finish(ray_session, tmp_path):
    from streamcal.runtime import run_graph

    res = run_graph(parse_graph(graph(tmp_path, replicas=2, partitions="[2.0, 1.0]")), print_summary=False,
                    progress=False)
    assert res.status == "completed", res.problems
    w0, w1 = (r["summary"] for r in _worker_summaries(res))
    assert w0["group"]["world"] == 2 and w0["group"]["backend"] == "gloo"
    assert w0["syncs"] == w1["syncs"] > 3  # every all-reduce had both replicas
    assert w0["events_seen"] == pytest.approx(2 * w1["events_seen"], rel=0.1)  # the 2:1 partition
    assert w0["epoch_cost"] == w1["epoch_cost"]  # the reduced sums are the same everywhere
    costs = w0["epoch_cost"]
    assert costs[-1] < costs[0]
    assert np.isfinite(np.load(tmp_path / "theta.npy")).all()
    assert _rows(res)["store"]["in_msgs"] >= 1


@pytest.mark.ray
def test_a_killed_worker_is_restarted_and_rejoins(ray_session, tmp_path):
    import ray

    from streamcal.runtime import run_graph

    def kill_after_first_sync(actors):
        def watch():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if ray.get(actors["align/1"].status.remote(), timeout=5)["work"] >= 3:  # tau = 2
                        ray.kill(actors["align/1"], no_restart=False)
                        return
                except Exception:  # noqa: BLE001 - the actor may be busy starting
                    pass
                time.sleep(0.05)

        threading.Thread(target=watch, daemon=True).start()

    res = run_graph(parse_graph(graph(tmp_path, replicas=2, partitions="[1.0, 1.0]", events=4000, restarts=2)),
                    print_summary=False, progress=False, on_started=kill_after_first_sync)
    assert res.status == "completed", res.problems
    assert _rows(res)["align"]["restarts"] >= 1
    w0, w1 = (r["summary"] for r in _worker_summaries(res))
    assert w0["group"]["reformations"] >= 1 and w0["group"]["failures"] >= 1
    assert w1["group"]["generation"] == w0["group"]["generation"] >= 1
    assert w0["epochs"] == 3 and w0["epoch_cost"][-1] < w0["epoch_cost"][0]
    assert np.isfinite(np.load(tmp_path / "theta.npy")).all()


@pytest.mark.ray
def test_the_shipped_alignment_graph_runs(ray_session, tmp_path):
    from pathlib import Path

    from streamcal.runtime import run_graph

    text = (Path(__file__).resolve().parents[2] / "configs" / "its_align.yaml").read_text()
    # its outputs go under runs/ of the working directory (the replicas' one, not the test's)
    spec = parse_graph(text.replace("runs/its_align", str(tmp_path / "runs" / "its_align")))
    res = run_graph(spec, print_summary=False, progress=False)
    assert res.status == "completed", res.problems
    w0 = _worker_summaries(res)[0]["summary"]
    assert w0["epochs"] == spec.stage("align").config["epochs"] and w0["epoch_cost"][-1] < 0.7 * w0["epoch_cost"][0]
    assert (tmp_path / "runs" / "its_align" / "theta.npy").exists()
