"""The 1D correction's compact payload: the (3, nr, nz) map of ``tpc.correction_rz`` (the same at
every phi) instead of the (3, nphi, nr, nz) map of ``tpc.correction``. Every reader gets the same
correction from either: the broadcast equals the full map, the 3D stage's result is identical, and
mismatched schemas or shapes are refused with their names."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from streamcal import wire
from streamcal.detectors.tpc.streams import (
    broadcast_over_phi,
    correction_rz_schema,
    correction_schema,
    idc_schema,
)
from streamcal.schemas import tensor_column, tensor_to_numpy, tensor_type
from streamcal.testing import run_stage

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ROOT / "models" / "weights"
GRID = "18x9x9"
MS = 1_000_000


def idc_items(n: int, grid: str = GRID, seed: int = 0) -> list:
    nphi, nr = (int(d) for d in grid.split("x")[:2])
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        v = float(1 + 0.05 * rng.normal())
        b = pa.RecordBatch.from_arrays(
            [pa.array([k], pa.int64()), pa.array([v], pa.float64()), tensor_column(np.full((1, nphi, nr), v, np.float32))],
            schema=idc_schema(grid).schema)
        out.append((b, k * MS, (k + 1) * MS))
    return out


def corrections(out: list) -> np.ndarray:
    return np.stack([tensor_to_numpy(b.column("correction"))[0] for _, b in out])


def both_payloads(config: dict, items: list) -> tuple[list, list]:
    _, compact = run_stage("tpc_sc1d", {**config, "payload": "compact"}, {"idc": items})
    _, full = run_stage("tpc_sc1d", {**config, "payload": "full"}, {"idc": items})
    return compact["out"], full["out"]


def assert_same_frames(compact: list, full: list, grid: str) -> None:
    """Same frames, same fields; the compact correction broadcast over phi equals the full one."""
    assert len(compact) == len(full) > 0
    for (hc, bc), (hf, bf) in zip(compact, full):
        assert hc.schema == f"tpc.correction_rz/{grid}" and hf.schema == f"tpc.correction/{grid}"
        assert (hc.t0_ns, hc.t1_ns) == (hf.t0_ns, hf.t1_ns)
        for name in ("frame", "slices", "missing", "degraded", "method"):
            assert bc.column(name).equals(bf.column(name)), name
    c, f = corrections(compact), corrections(full)
    assert c.shape[1:] == (3, *f.shape[3:]) and f.shape[1:] == (3, *(int(d) for d in grid.split("x")))
    np.testing.assert_array_equal(broadcast_over_phi(c, grid), f)
    assert np.abs(f).max() > 0


def test_linear_scaler_compact_payload_broadcast_equals_the_full_map():
    compact, full = both_payloads({"grid": GRID}, idc_items(250))
    assert_same_frames(compact, full, GRID)
    # the payload on the wire: nphi times fewer correction values
    sizes = [len(wire.encode_payload(out[-1][1])) for out in (compact, full)]
    assert sizes[0] * 8 < sizes[1], sizes  # 18 phi nodes; the schema message is the same


def test_model_compact_payload_broadcast_equals_the_full_map():
    grid = "90x17x17"
    compact, full = both_payloads({"grid": grid, "method": "model", "checkpoint": str(WEIGHTS / "sc1d_90x17x17.pt")},
                                  idc_items(230, grid))
    assert_same_frames(compact, full, grid)
    sizes = [len(wire.encode_payload(out[-1][1])) for out in (compact, full)]
    assert sizes[0] < 5_000 and sizes[1] > 300_000, sizes  # 3 x 17 x 17 vs 3 x 90 x 17 x 17 float32


def test_the_3d_stage_gives_the_same_result_on_the_compact_and_the_full_1d_correction(monkeypatch):
    monkeypatch.chdir(ROOT)
    grid = "90x17x17"
    _, src = run_stage("tpc_idc", {"grid": grid, "intervals": 40, "speed": 0, "clock": "zero", "seed": 4})
    idc = [(b, h.t0_ns, h.t1_ns) for h, b in src["out"]]
    sc1d = {"grid": grid, "method": "model", "checkpoint": "models/weights/sc1d_90x17x17.pt"}
    sc3d = {"grid": grid, "method": "model", "checkpoint": "models/weights/sc3d_90x17x17.pt", "device": "cpu",
            "residual_input": True, "batch": 2, "max_wait_frames": 2}
    results = {}
    for payload in ("compact", "full"):
        _, pre = run_stage("tpc_sc1d", {**sc1d, "payload": payload}, {"idc": idc})
        st, out = run_stage("tpc_sc3d", {**sc3d, "pre_payload": payload},
                            {"idc": idc, "pre": [(b, h.t0_ns, h.t1_ns) for h, b in pre["out"]]})
        assert st.summary()["frames"] == 4 and st.summary()["not_corrected"] == 0
        results[payload] = out["out"]
    (c, f) = (corrections(results[p]) for p in ("compact", "full"))
    assert c.shape == (4, 3, 90, 17, 17)
    np.testing.assert_array_equal(c, f)  # identical, not merely close
    assert [b.column("frame")[0].as_py() for _, b in results["compact"]] == [0, 1, 2, 3]


def test_the_3d_corrector_broadcasts_a_phi_independent_precorrection_and_names_bad_shapes():
    from streamcal.detectors.tpc.tasks import load_corrector

    corr = load_corrector(WEIGHTS / "sc3d_90x17x17.pt")
    rng = np.random.default_rng(1)
    avg = np.full((2, 90, 17, 17), 1.0, np.float32)
    fl = 0.01 * rng.normal(size=(2, 90, 17, 17)).astype(np.float32)
    pre = 0.01 * rng.normal(size=(2, 3, 17, 17)).astype(np.float32)
    full_pre = np.ascontiguousarray(np.broadcast_to(pre[:, :, None], (2, 3, 90, 17, 17)))
    np.testing.assert_array_equal(corr.predict_batch(avg, fl, pre), corr.predict_batch(avg, fl, full_pre))
    np.testing.assert_array_equal(corr.predict(avg[0], fl[0], pre[0]), corr.predict(avg[0], fl[0], full_pre[0]))
    with pytest.raises(ValueError, match=r"precorrection must have shape \(2, 3, 90, 17, 17\) or, phi-independent, "
                                         r"\(2, 3, 17, 17\), got \(2, 3, 17, 9\)"):
        corr.predict_batch(avg, fl, pre[..., :9])


def test_broadcast_over_phi_is_a_view_and_names_a_wrong_shape():
    c = np.arange(3 * 9 * 9, dtype=np.float32).reshape(3, 9, 9)
    b = broadcast_over_phi(c, GRID)
    assert b.shape == (3, 18, 9, 9) and np.shares_memory(b, c) and not b.flags.writeable
    np.testing.assert_array_equal(b[:, 7], c)
    full = np.zeros((2, 3, 18, 9, 9))
    assert broadcast_over_phi(full, GRID) is full  # a full map passes through
    assert broadcast_over_phi(np.zeros((5, 3, 9, 9)), GRID).shape == (5, 3, 18, 9, 9)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 9, 9\) \(phi-independent\) or \(\.\.\., 3, 18, 9, 9\), got shape \(3, 9, 8\)"):
        broadcast_over_phi(np.zeros((3, 9, 8)), GRID)


def test_a_graph_whose_1d_payload_and_3d_input_differ_is_refused_naming_both_schemas():
    from streamcal.errors import GraphError
    from streamcal.graph import parse_graph, validate_graph

    def graph(payload: str, pre_payload: str) -> str:
        return f"""
        stages:
          - {{name: idc, kind: tpc_idc, config: {{grid: {GRID}, intervals: 10}}, outputs: {{out: idc}}}}
          - {{name: sc1d, kind: tpc_sc1d, config: {{grid: {GRID}, payload: {payload}}}, inputs: {{idc: idc}},
              outputs: {{out: c1d}}}}
          - {{name: sc3d, kind: tpc_sc3d, config: {{grid: {GRID}, method: numerical, residual_input: true,
              pre_payload: {pre_payload}}}, inputs: {{idc: idc, pre: c1d}}, outputs: {{out: c3d}}}}
        streams:
          c3d: {{publish: "tcp://127.0.0.1:5999"}}
        """

    for payload in ("compact", "full"):
        validate_graph(parse_graph(graph(payload, payload)))
    with pytest.raises(GraphError) as err:
        validate_graph(parse_graph(graph("full", "compact")))
    msg = str(err.value)
    assert "'inputs.pre'" in msg and f"writes 'tpc.correction/{GRID}'" in msg and f"reads 'tpc.correction_rz/{GRID}'" in msg


def _pre_port_stage():
    from streamcal.stage import InputWiring, StageContext, get_stage_class

    cls = get_stage_class("tpc_sc3d")
    cfg = cls.Config.from_dict({"grid": GRID, "method": "numerical", "residual_input": True})
    ctx = StageContext(stage="sc3d", kind="tpc_sc3d",
                       inputs={"idc": InputWiring("idc", ("idc/0",)), "pre": InputWiring("c1d", ("sc1d/0",))},
                       outputs={"out": "c3d"})
    ctx.send = lambda port, h, b: 0
    st = cls(cfg, ctx)
    st.setup()
    return st


def _message(info, batch: pa.RecordBatch, seq: int = 0) -> list:
    h = wire.Header(stream="c1d", seq=seq, producer="sc1d/0", t0_ns=0, t1_ns=10 * MS, schema=info.name,
                    fp=info.fingerprint, extra={"lseq": seq})
    return wire.encode(h, batch)


def _row(schema: pa.Schema, corr: np.ndarray) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array([0], pa.int64()), tensor_column(corr[None]), pa.array([10], pa.int32()), pa.array([0], pa.int32()),
         pa.array([False]), pa.array(["model"])], schema=schema)


def test_the_3d_stage_rejects_a_full_map_or_a_wrong_shape_on_its_compact_input_with_the_reason():
    st = _pre_port_stage()
    rz, full = correction_rz_schema(GRID), correction_schema(GRID)
    st.receive("pre", _message(full, _row(full.schema, np.zeros((3, 18, 9, 9), np.float32)), 0))
    # 3 x 9 x 8: the shape of another grid, under this grid's name
    wrong = rz.schema.set(1, pa.field("correction", tensor_type(pa.float32(), (3, 9, 8)), nullable=False))
    st.receive("pre", _message(rz, _row(wrong, np.zeros((3, 9, 8), np.float32)), 1))
    st.receive("pre", _message(rz, _row(rz.schema, np.full((3, 9, 9), np.nan, np.float32)), 2))
    assert dict(st.metrics.inputs["pre"].rejects) == {"schema_mismatch": 1, "shape": 1, "nan": 1}
    st.receive("pre", _message(rz, _row(rz.schema, np.ones((3, 9, 9), np.float32)), 3))
    assert list(st.pre) == [0] and st.pre[0].shape == (3, 9, 9)


def test_a_phi_dependent_model_needs_the_full_payload(monkeypatch):
    from streamcal.detectors.tpc import tasks
    from streamcal.errors import ConfigError

    class PhiModel:  # a model trained with use_phi: its correction differs between phi nodes
        phi_independent = False

        def predict(self, idc1d):
            return np.zeros((3, 18, 9, 9), np.float32)

    monkeypatch.setattr(tasks, "load_corrector", lambda *a, **k: PhiModel())
    cfg = {"grid": GRID, "method": "model", "checkpoint": "phi.pt"}
    with pytest.raises(ConfigError, match=r"payload.*depends on phi \(model\.use_phi\).*payload: full"):
        run_stage("tpc_sc1d", cfg, {"idc": []})
    _, out = run_stage("tpc_sc1d", {**cfg, "payload": "full"}, {"idc": idc_items(10)})
    assert out["out"][0][0].schema == f"tpc.correction/{GRID}"


def test_the_reference_client_gives_the_full_map_of_either_payload():
    spec = importlib.util.spec_from_file_location("subscribe_client", ROOT / "scripts" / "subscribe_client.py")
    client = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = client
    try:
        spec.loader.exec_module(client)
    finally:
        del sys.modules[spec.name]
    compact, full = both_payloads({"grid": GRID}, idc_items(30))
    (hc, bc), (hf, bf) = compact[-1], full[-1]
    mc, mf = client.tpc_correction_map(hc.schema, bc), client.tpc_correction_map(hf.schema, bf)
    assert mc.shape == mf.shape == (1, 3, 18, 9, 9)
    np.testing.assert_array_equal(mc, mf)
    sc = client.handle_batch({"schema": hc.schema}, bc)["correction"]
    sf = client.handle_batch({"schema": hf.schema}, bf)["correction"]
    assert sc["shape"] == sf["shape"] == [1, 3, 18, 9, 9] and sc["phi_independent"] and not sf["phi_independent"]
    with pytest.raises(ValueError, match=r"tpc\.correction_rz/18x9x8: correction of shape \(3, 9, 9\), expected \(3, 9, 8\)"):
        client.tpc_correction_map("tpc.correction_rz/18x9x8", bc)


def test_the_live_1d_fast_path_equals_the_corrector():
    """The stage's per-frame path (features, scale and output order folded into fixed matrices)
    gives the corrector's correction to float32 rounding."""
    from streamcal.detectors.tpc.tasks import load_corrector

    corr = load_corrector(WEIGHTS / "sc1d_90x17x17.pt")
    live = corr.live_predictor(200)
    assert live is not None
    rng = np.random.default_rng(3)
    for _ in range(5):
        h = 1 + 0.1 * rng.normal(size=200)
        want = corr.predict_batch(h[None], broadcast=False)[0]  # (3, nr, nz)
        got = live(h)
        assert got.shape == (3, 17, 17) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)  # cm
        np.testing.assert_allclose(broadcast_over_phi(got, "90x17x17"), corr.predict(h), rtol=0, atol=1e-7)
    assert np.abs(want).max() > 1e-3
