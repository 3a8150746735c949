"""The live TPC stages: IDC source, 1D correction per time frame; gaps, out-of-order and bad
slices; the linear-scaler correction against its closed form."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from streamcal.detectors.tpc.streams import average_correction, broadcast_over_phi, idc_schema
from streamcal.detectors.tpc.tasks import linear_scaler
from streamcal.schemas import tensor_column, tensor_to_numpy
from streamcal.testing import run_graph_local, run_stage

GRID = "18x9x9"
MS = 1_000_000


def idc_batch(k: int, value: float, nphi: int = 18, nr: int = 9) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array([k], pa.int64()), pa.array([value], pa.float64()),
         tensor_column(np.full((1, nphi, nr), value, np.float32))],
        schema=idc_schema(GRID).schema,
    )


def slices(values: dict[int, float]) -> list:
    return [(idc_batch(k, v), k * MS, (k + 1) * MS) for k, v in values.items()]


def test_one_correction_per_frame_equal_to_the_linear_scaler():
    rng = np.random.default_rng(0)
    vals = {k: float(1 + 0.05 * rng.normal()) for k in range(250)}
    stage, out = run_stage("tpc_sc1d", {"grid": GRID}, {"idc": slices(vals)})
    frames = out["out"]
    assert len(frames) == 25
    h, b = frames[-1]
    assert (h.t0_ns, h.t1_ns) == (240 * MS, 250 * MS)
    assert b.column("frame")[0].as_py() == 24 and not b.column("degraded")[0].as_py()
    assert b.column("slices")[0].as_py() == 10 and b.column("missing")[0].as_py() == 0
    window = np.array([vals[k] for k in range(50, 250)])
    avg = average_correction(GRID)
    want = avg * (window.mean() - 1.0)  # closed form of the baseline
    # published phi-independent, (3, nr, nz): the same at every phi
    assert h.schema == f"tpc.correction_rz/{GRID}"
    got = broadcast_over_phi(tensor_to_numpy(b.column("correction"))[0], GRID)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(linear_scaler(avg, window), want)
    assert "trigger_sent_ns" in h.extra


def test_gaps_mark_frames_degraded_and_out_of_order_is_rejected():
    vals = {k: 1.0 for k in range(60) if k not in (13, 29)}  # 13: mid-frame; 29: last of frame 2
    items = slices(vals)
    items.insert(20, (idc_batch(5, 1.0), 5 * MS, 6 * MS))  # a late duplicate of interval 5
    stage, out = run_stage("tpc_sc1d", {"grid": GRID}, {"idc": items})
    rows = {b.column("frame")[0].as_py(): b for _, b in out["out"]}
    assert sorted(rows) == list(range(6))  # frame 2 published although its last interval never came
    assert rows[0].column("missing")[0].as_py() == 0 and rows[0].column("slices")[0].as_py() == 10
    assert rows[1].column("degraded")[0].as_py() and rows[1].column("slices")[0].as_py() == 9
    assert rows[2].column("degraded")[0].as_py() and rows[2].column("slices")[0].as_py() == 9
    # later frames still see the two gaps in their 200-interval window
    assert rows[5].column("missing")[0].as_py() == 2 and rows[5].column("degraded")[0].as_py()
    s = stage.summary()
    assert s["out_of_order"] == 1 and s["missing_intervals"] == 2 and s["frames"] == 6
    assert stage.metrics.inputs["idc"].rejects["out_of_order"] == 1


def test_nan_and_wrong_shape_slices_are_rejected_at_the_edge():
    from streamcal import wire
    from streamcal.stage import InputWiring, StageContext, get_stage_class

    cls = get_stage_class("tpc_sc1d")
    cfg = cls.Config.from_dict({"grid": GRID})
    ctx = StageContext(stage="sc1d", kind="tpc_sc1d", inputs={"idc": InputWiring("idc", ("p/0",))},
                       outputs={"out": "c"})
    sent = []
    ctx.send = lambda port, h, b: sent.append((h, b)) or 0
    st = cls(cfg, ctx)
    st.setup()
    info = idc_schema(GRID)

    def frames(k, batch):
        h = wire.Header(stream="idc", seq=k, producer="p/0", t0_ns=k * MS, t1_ns=(k + 1) * MS,
                        schema=info.name, fp=info.fingerprint, extra={"lseq": k})
        return wire.encode(h, batch)

    st.receive("idc", frames(0, idc_batch(0, float("nan"))))
    wrong = pa.RecordBatch.from_arrays(
        [pa.array([1], pa.int64()), pa.array([1.0]), tensor_column(np.ones((1, 9, 18), np.float32))],
        names=["interval", "idc1d", "idc2d"])
    st.receive("idc", frames(1, wrong))
    for k in range(2, 10):
        st.receive("idc", frames(k, idc_batch(k, 1.0)))
    rej = dict(st.metrics.inputs["idc"].rejects)
    assert rej.get("nan") == 1 and sum(rej.values()) == 2, rej
    assert len(sent) == 1 and sent[0][1].column("degraded")[0].as_py()  # frame 0 lacks 2 slices


def test_idc_source_statistics_and_withheld_slices():
    stage, out = run_stage("tpc_idc", {"grid": GRID, "intervals": 400, "speed": 0, "clock": "zero",
                                       "seed": 3, "skip_every": 100})
    msgs = out["out"]
    assert len(msgs) == 396 and stage.summary()["withheld"] == 4
    v = np.array([b.column("idc1d")[0].as_py() for _, b in msgs])
    # relative 1D IDC: mean 1 (Poisson pile-up of ~50 collisions per ms fluctuates ~20 %)
    assert abs(v.mean() - 1) < 0.05 and 0.1 < v.std() < 0.4
    assert msgs[0][0].t0_ns == 0 and msgs[-1][0].t1_ns == 399 * MS  # interval 399 was withheld
    m = tensor_to_numpy(msgs[0][1].column("idc2d"))[0]
    assert m.shape == (18, 9) and np.isfinite(m).all()


def test_bad_configs_name_the_field():
    from streamcal.errors import ConfigError

    with pytest.raises(ConfigError, match="checkpoint"):
        run_stage("tpc_sc1d", {"grid": GRID, "method": "model"}, {})
    with pytest.raises(ConfigError, match="grid"):
        run_stage("tpc_idc", {"grid": "91x2x17"})


def test_tpc_graph_in_process():
    res = run_graph_local(f"""
    stages:
      - {{name: idc, kind: tpc_idc, config: {{grid: {GRID}, intervals: 300, speed: 0, clock: zero, seed: 2}}, outputs: {{out: idc}}}}
      - {{name: sc1d, kind: tpc_sc1d, config: {{grid: {GRID}}}, inputs: {{idc: idc}}, outputs: {{out: corr}}}}
      - {{name: sink, kind: collect, inputs: {{in: corr}}}}
    """)
    assert res.stage("sink").summary()["messages"] == 30
    assert res.stage("sc1d").summary()["degraded"] == 19  # until one drift time (200 intervals) was seen


def test_3d_stage_rebuilds_the_density_from_the_idc_history_exactly():
    """The 3D stage sees only the IDC maps; after one ion drift time its density (hence its
    numerical correction) equals the source's true one."""
    import torch

    from streamcal.detectors.tpc.langevin import space_charge_distortions

    src, out = run_stage("tpc_idc", {"grid": GRID, "intervals": 300, "speed": 0, "clock": "zero", "seed": 5})
    items = [(b, h.t0_ns, h.t1_ns) for h, b in out["out"]]
    st, res = run_stage("tpc_sc3d", {"grid": GRID, "method": "numerical", "batch": 4}, {"idc": items})
    frames = res["out"]
    assert len(frames) == 30 and st.summary()["not_corrected"] == 0
    degraded = [b.column("degraded")[0].as_py() for _, b in frames]
    assert degraded == [True] * 19 + [False] * 11  # until the history holds 200 intervals
    truth = space_charge_distortions(torch.as_tensor(src.live.density()), GRID, corrections=True).correction.numpy()
    want = truth - average_correction(GRID)
    got = tensor_to_numpy(frames[-1][1].column("correction"))[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert np.abs(want).max() > 1e-3  # a real fluctuation (> 10 um somewhere), not zeros


def test_interval_ring_orders_fills_gaps_and_refuses_old_intervals():
    from streamcal.detectors.tpc.streams import IntervalRing

    r = IntervalRing(4)
    assert r.seen == 0 and r.ordered().shape == (0,)
    assert [r.put(k, float(k)) for k in (0, 1, 4)] == [0, 0, 2]  # 2 and 3 missing
    assert r.put(3, 9.0) == -1 and r.put(4, 9.0) == -1
    np.testing.assert_array_equal(r.ordered(), [1.0, 1.0, 1.0, 4.0])  # gaps hold the last value
    assert r.seen == 4 and r.missing == 2
    r.put(5, 5.0), r.put(6, 6.0)
    assert r.missing == 1  # interval 3 is still in the window
    np.testing.assert_array_equal(r.ordered(), [1.0, 4.0, 5.0, 6.0])


def test_interval_ring_matches_a_plain_list_of_the_window():
    """The doubled buffer gives the window in time order, the same as a list of what arrived with
    gaps filled by the last value, through wrap-arounds and gaps longer than the window."""
    from streamcal.detectors.tpc.streams import IntervalRing

    rng = np.random.default_rng(7)
    r = IntervalRing(5, shape=(2,))
    window: list[tuple[int, np.ndarray, bool]] = []  # (interval, value, present)
    k = -1
    for i in range(200):
        k += 1 if i == 0 else int(rng.choice([1, 1, 1, 2, 4, 9]))  # gaps of 1, 3 and 8 intervals too
        v = rng.normal(size=2)
        held = window[-1][1] if window else None
        window += [(j, held, False) for j in range(window[-1][0] + 1 if window else k, k)]
        window.append((k, v, True))
        window = window[-5:]
        r.put(k, v)
        want = np.array([w[1] for w in window])
        got = r.ordered()
        np.testing.assert_array_equal(got, want)
        assert not got.flags.writeable and r.seen == len(window)
        assert r.missing == sum(not w[2] for w in window) == r.seen - r.present.sum()


@pytest.mark.parametrize("method", ["linear", "model"])
def test_prewarm_changes_nothing_but_the_timing(method):
    """The discarded computation one interval before a frame's last leaves every frame as it was,
    with gaps and late intervals too."""
    from pathlib import Path

    grid = GRID if method == "linear" else "90x17x17"
    ckpt = str(Path(__file__).resolve().parents[2] / "models" / "weights" / "sc1d_90x17x17.pt")
    nphi, nr = (int(d) for d in grid.split("x")[:2])
    rng = np.random.default_rng(5)
    items = [(pa.RecordBatch.from_arrays(
        [pa.array([k], pa.int64()), pa.array([v], pa.float64()), tensor_column(np.full((1, nphi, nr), v, np.float32))],
        schema=idc_schema(grid).schema), k * MS, (k + 1) * MS)
        for k, v in ((k, float(1 + 0.05 * rng.normal())) for k in range(260)) if k not in (18, 57, 58, 119)]
    items.insert(100, items[40])  # a late interval
    runs = [run_stage("tpc_sc1d", {"grid": grid, "method": method, "checkpoint": ckpt, "prewarm": p}, {"idc": items})
            for p in (True, False)]
    (_, warm), (_, cold) = runs
    assert len(warm["out"]) == len(cold["out"]) == 26
    for (hw, bw), (hc, bc) in zip(warm["out"], cold["out"]):
        assert (hw.t0_ns, hw.t1_ns, hw.extra["src"]) == (hc.t0_ns, hc.t1_ns, hc.extra["src"]) and bw.equals(bc)
    assert runs[0][0].summary() | {"compute_p50_ms": 0, "compute_p99_ms": 0} == \
        runs[1][0].summary() | {"compute_p50_ms": 0, "compute_p99_ms": 0}
